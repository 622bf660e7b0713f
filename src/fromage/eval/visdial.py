"""VisDial v1.0 val (the paper's Table 2): answer ranking (IT2T) and image retrieval (T2I),
under one of two named protocols.

``paper`` (the default) computes what the authors' evaluation scripts compute, quirks
included, so that its numbers can be set beside Table 2's:

- every image is squashed to 224 x 224 (aspect ratio not kept) before the model's own
  preprocessing;
- IT2T: the context ``Q: q1?\\nA: a1\\n...Q: qr?\\nA: `` (trailing space) is tokenized with
  the tokenizer's special prefix (BOS for OPT), and so is every candidate answer, on its
  own and without a leading space; each answer token, its BOS included, is scored by the
  logits at its *own* position (the probability that the next token repeats it), not by
  the previous position's;
- NDCG reads the scores of the round after the annotated one (the dense ``round_id`` is
  1-based and is used as a 0-based index): round 10 pairs with the next dialog's first
  round, and the last dialog's round 10 is dropped;
- T2I: ``Q: q1? A: a1. ... Q: q10? A: a10.[RET]`` (no caption, BOS first); for each
  image the dialogues are ranked (image-to-text) and R@k is over images.

``corrected`` evaluates the method as the paper describes the tasks: the context ends
``\\nA:`` and each answer continues it (`` answer``, no BOS of its own), scored by its
next-token log-likelihood; NDCG on the annotated round; T2I ``caption. Q: ... [RET]``
ranks the split's images for each dialogue (text-to-image); images are preprocessed as
in training. docs/visdial.md lists every difference with the demo model's numbers.

Both report MRR, R@1/5/10 and mean rank over all rounds, and NDCG (k = number of
relevant answers) over one round per densely annotated dialog.

    python -m fromage.eval.visdial MODEL --data data/visdial/val --protocol paper \\
        --out runs/eval/visdial-paper.json
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchmetrics.functional.retrieval import retrieval_normalized_dcg
from transformers import DynamicCache

from fromage.config import positive_int
from fromage.data.image_sources import ImageRecord, open_image
from fromage.eval.common import eval_parser, split_bank, squash
from fromage.infer.bank import ImageBank, read_jsonl
from fromage.infer.bank_build import chunks
from fromage.infer.scoring import log_likelihood, retrieval_queries
from fromage.model.fromage import FromageModel
from fromage.model.load import load_model
from fromage.model.tokens import RET_TOKEN
from fromage.ranks import recall_at_k, target_ranks
from fromage.reporting import markdown_table, write_json

PROTOCOLS = ("paper", "corrected")
TASKS = ("it2t", "t2i")
# Which round's scores the dense annotation of round r (0-based) is compared with: r + 1
# in the release's script (its 1-based round_id used as a 0-based index), r otherwise.
NDCG_ROUND_SHIFT = {"paper": 1, "corrected": 0}


# ----------------------------------------------------------------- prompts
def dialogue_so_far(dialog: dict, round_index: int) -> str:
    """``Q: q1?\\nA: a1\\n...\\nQ: qr?\\nA:``: the earlier rounds and the question of
    ``round_index`` (0-based), ending where its answer goes."""
    lines = []
    for past in dialog["rounds"][:round_index]:
        lines += [f"Q: {past['question']}?", f"A: {past['answer']}"]
    lines.append(f"Q: {dialog['rounds'][round_index]['question']}?")
    return "\n".join(lines) + "\nA:"


def answer_prompt(dialog: dict, round_index: int, protocol: str) -> tuple[str, list[str]]:
    """The context and the candidate answers of a round, written as ``protocol`` writes
    them: the release puts the space at the context's end (``...A: `` + ``yes``), the
    corrected protocol before the answer (``...A:`` + `` yes``), as text runs on."""
    context = dialogue_so_far(dialog, round_index)
    options = dialog["rounds"][round_index]["options"]
    if protocol == "paper":
        return context + " ", list(options)
    return context, [" " + option for option in options]


def retrieval_prompt(dialog: dict, protocol: str) -> str:
    """The T2I query text: all rounds, then ``[RET]``; the corrected protocol puts the
    image's caption first, as the paper's task statement does; the release's script does not."""
    turns = " ".join(f"Q: {r['question']}? A: {r['answer']}." for r in dialog["rounds"])
    if protocol == "paper":
        return f"{turns}{RET_TOKEN}"
    return f"{dialog['caption']}. {turns}{RET_TOKEN}"


# ----------------------------------------------------------------- images
# ----------------------------------------------------------------- paper scoring
def paper_token_ids(model: FromageModel, texts: Sequence[str]):
    """``texts`` tokenized each on its own with the tokenizer's special tokens (BOS
    first for OPT), right-padded: ``input_ids`` and ``attention_mask``, (n, T)."""
    return model.tokenizer(
        list(texts),
        add_special_tokens=True,
        padding="longest",
        padding_side="right",
        return_tensors="pt",
    ).to(model.image_to_lm.weight.device)


@torch.no_grad()
def own_position_scores(
    model: FromageModel, visual: torch.Tensor, context: str, answers: Sequence[str]
) -> torch.Tensor:
    """The release's answer scores, (n,): for ``[image, BOS context, BOS answer]`` the
    sum over the answer's positions t (BOS included) of log softmax(logits[t])[ids[t]],
    i.e. cross-entropy on unshifted logits. ``visual``: the image's (k, d_emb) tokens.

    The context (with the image) runs once; its KV cache is shared by the answers, which
    run as one batch: the same numbers as the release's one pass per padded answer.
    """
    context_ids = paper_token_ids(model, [context]).input_ids  # (1, C)
    prompt = torch.cat([visual[None].to(model.lm_dtype), model.embed_ids(context_ids)], 1)
    answer = paper_token_ids(model, answers)  # (n, T)
    model.check_fits(prompt.shape[1] + answer.input_ids.shape[1], "context + answer")
    cache = DynamicCache(config=model.lm.config)
    model.run_lm(prompt, cache=cache)
    cache.batch_repeat_interleave(len(answers))
    mask = torch.cat(
        [answer.attention_mask.new_ones(len(answers), prompt.shape[1]), answer.attention_mask], 1
    )
    hidden = model.run_lm(model.embed_ids(answer.input_ids), mask, cache=cache).last_hidden_state
    log_p = model.token_logits(hidden).log_softmax(-1)  # (n, T, V): at each answer position
    own = log_p.gather(-1, answer.input_ids[..., None])[..., 0]  # (n, T)
    return (own * answer.attention_mask).sum(1)


@torch.no_grad()
def paper_queries(model: FromageModel, texts: Sequence[str]) -> torch.Tensor:
    """The release's T2I queries, (n, shared_dim): each text tokenized with the tokenizer's
    special tokens, the normalised ``[RET]`` embedding read at its last token."""
    batch = paper_token_ids(model, texts)
    output = model.run_lm(
        model.embed_ids(batch.input_ids),
        batch.attention_mask,
        all_hidden_states=model.needs_all_hidden_states,
    )
    return model.retrieval_embeddings(output, batch.attention_mask.sum(1) - 1)


def image_to_text_ranks(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """The release's T2I ranking: ``images @ texts.T`` read row by row, i.e. for each
    image i the 0-based rank of dialogue i among all dialogues, (N,). A row's scale (the
    release does not normalise the image side) does not change its ranking."""
    return target_ranks(images @ texts.T, torch.arange(len(images), device=images.device))


# ----------------------------------------------------------------- metrics
def gt_ranks(scores: torch.Tensor, gt_index: torch.Tensor) -> torch.Tensor:
    """1-based rank of the ground-truth option in each row (ties count against it)."""
    return target_ranks(scores, gt_index) + 1


def answer_metrics(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    return {
        "MRR": float((1.0 / ranks).mean()),
        **recall_at_k(ranks - 1, ks),
        "mean rank": float(ranks.float().mean()),
    }


def ndcg(scores: torch.Tensor, relevance: torch.Tensor) -> float:
    """Mean NDCG@k over rows, k being the row's number of relevant options (VisDial's NDCG)."""
    values = [
        retrieval_normalized_dcg(s, r, top_k=int((r > 0).sum()))
        for s, r in zip(scores, relevance, strict=True)
    ]
    return float(torch.stack(values).mean())


ROUND_KEYS = ("question", "answer", "options", "gt_index")


def check_dialogs(dialogs: Sequence[dict], source: str = "dialogs") -> None:
    """Refuse dialogs whose rounds lack an answer or whose dense annotation names a round
    the dialog does not have: its relevances would be scored against another dialog's
    rounds (the rows of all dialogs are stacked), a silently wrong NDCG."""
    for dialog in dialogs:
        image_id = dialog.get("image_id", "?")
        for number, round_ in enumerate(dialog["rounds"], 1):
            missing = [key for key in ROUND_KEYS if key not in round_]
            if missing:
                raise ValueError(
                    f"{source}: dialog of image {image_id}, round {number} has no {missing}; "
                    "write the file again with data_prep/visdial.py"
                )
        dense = dialog["dense"]
        if dense is not None and not 0 <= dense["round"] < len(dialog["rounds"]):
            raise ValueError(
                f"{source}: the dense annotation of image {image_id} is for round "
                f"{dense['round'] + 1}, but that dialog has {len(dialog['rounds'])} rounds; "
                "check the dialogs and dense annotations are of the same split and version"
            )


def dense_rows(dialogs: Sequence[dict], n_rows: int, shift: int) -> list[tuple[int, list[float]]]:
    """(row of the stacked round scores, relevance) for each densely annotated dialog, the
    rows being all rounds of ``dialogs`` in order; the row is the annotated round's plus
    ``shift`` (``NDCG_ROUND_SHIFT``), and pairs falling past the last row are dropped."""
    pairs, first = [], 0
    for dialog in dialogs:
        if dialog["dense"] is not None and first + dialog["dense"]["round"] + shift < n_rows:
            pairs.append((first + dialog["dense"]["round"] + shift, dialog["dense"]["relevance"]))
        first += len(dialog["rounds"])
    return pairs


# ----------------------------------------------------------------- the evaluation
def dialog_answer_scores(
    model: FromageModel, dialog: dict, image: Image.Image, protocol: str
) -> list[torch.Tensor]:
    """Each round's (n_options,) candidate scores given the image and the dialogue so far."""
    if protocol == "paper":
        pixels = model.vision.preprocess(squash(image))[None].to(model.image_to_lm.weight.device)
        visual = model.visual_tokens(model.image_features(pixels))[0]  # (k, d_emb)
    scores = []
    for index in range(len(dialog["rounds"])):
        context, options = answer_prompt(dialog, index, protocol)
        if protocol == "paper":
            scores.append(own_position_scores(model, visual, context, options))
        else:
            scores.append(log_likelihood(model, [image, context], options))
    return scores


@torch.no_grad()
def t2i_ranks(
    model: FromageModel, dialogs: Sequence[dict], bank: ImageBank, protocol: str, batch_size: int
) -> torch.Tensor:
    """0-based rank per image (paper: its dialogue among the dialogues) or per dialogue
    (corrected: its image among the bank's images)."""
    batches = list(chunks(dialogs, batch_size))
    if protocol == "paper":
        queries = torch.cat(
            [paper_queries(model, [retrieval_prompt(d, protocol) for d in b]) for b in batches]
        )
        row = {image_id: i for i, image_id in enumerate(bank.ids)}
        images = bank.embeddings[[row[d["image_id"]] for d in dialogs]]  # (N, shared_dim)
        return image_to_text_ranks(images, queries.to(images))
    return torch.cat(
        [
            bank.ranks(
                retrieval_queries(model, [[retrieval_prompt(d, protocol)] for d in b]),
                [d["image_id"] for d in b],
            )
            for b in batches
        ]
    )


@torch.no_grad()
def evaluate_it2t(
    model: FromageModel, dialogs: Sequence[dict], bank: ImageBank, protocol: str, ks: Sequence[int]
) -> dict:
    """Answer ranking over every round of ``dialogs`` (their images taken from ``bank``)."""
    scores, gt = [], []
    for dialog in dialogs:
        image = open_image(bank.source_of(dialog["image_id"]))
        scores += dialog_answer_scores(model, dialog, image, protocol)
        gt += [round_["gt_index"] for round_ in dialog["rounds"]]
    scores = torch.stack(scores)  # (rounds, n_options)
    it2t = answer_metrics(gt_ranks(scores, torch.tensor(gt)), ks)
    dense = dense_rows(dialogs, len(scores), NDCG_ROUND_SHIFT[protocol])
    if dense:
        rows, relevance = zip(*dense, strict=True)
        it2t["NDCG"] = ndcg(scores[list(rows)], torch.tensor(relevance))
    return {"n_rounds": len(gt), "n_ndcg_rounds": len(dense), "it2t": it2t}


def evaluate_visdial(
    model: FromageModel,
    dialogs: Sequence[dict],
    bank: ImageBank,
    protocol: str = "paper",
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 16,
    tasks: Sequence[str] = TASKS,
) -> dict:
    """``tasks`` under ``protocol`` on the dialogs whose image is in ``bank`` (the split's
    images, embedded as the protocol preprocesses them)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    check_dialogs(dialogs)
    usable = [d for d in dialogs if d["image_id"] in bank]
    if not usable:
        raise ValueError(
            f"none of the {len(dialogs)} dialogs has its image in the bank: check the "
            "images data_prep/visdial.py found (dialogs.jsonl's image paths)"
        )
    results = {
        "protocol": protocol,
        "n_dialogs": len(usable),
        "n_skipped_missing_images": len(dialogs) - len(usable),
    }
    if "it2t" in tasks:
        results |= evaluate_it2t(model, usable, bank, protocol, ks)
    if "t2i" in tasks:
        results["t2i"] = recall_at_k(t2i_ranks(model, usable, bank, protocol, batch_size), ks)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = eval_parser(__doc__, "output of data_prep/visdial.py", "dialogs per T2I LM forward")
    parser.add_argument(
        "--max-dialogs", type=positive_int, help="evaluate only the first N dialogs"
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="paper",
        help="paper: what the authors' scripts compute (Table 2); corrected: next-token "
        "scoring, the annotated NDCG round, text-to-image ranking (default: paper)",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=TASKS,
        default=list(TASKS),
        help="it2t (answer ranking: 100 LM-scored answers a round, slow on a CPU) and/or t2i",
    )
    args = parser.parse_args(argv)

    dialogs_file = args.data / "dialogs.jsonl"
    dialogs = read_jsonl(dialogs_file, "write it again with data_prep/visdial.py")[
        : args.max_dialogs
    ]
    check_dialogs(dialogs, str(dialogs_file))  # before the model is loaded
    model = load_model(args.model, args.override)
    images = [ImageRecord(d["image_id"], d["image"]) for d in dialogs if d["image"]]
    # the paper protocol squashes every image to 224x224, as the authors' scripts did
    image_protocol = "paper" if args.protocol == "paper" else "crop"
    bank = split_bank(model, images, args.data / "banks", image_protocol=image_protocol)
    results = evaluate_visdial(
        model, dialogs, bank, args.protocol, batch_size=args.batch_size, tasks=args.tasks
    )
    results = {"model": str(args.model), **results}
    write_json(args.out, results)
    print(f"protocol: {args.protocol}")
    if "it2t" in results:
        print(markdown_table({"IT2T (answer ranking)": results["it2t"]}))
        print(f"{results['n_rounds']} rounds, NDCG over {results['n_ndcg_rounds']}")
    if "t2i" in results:
        direction = "dialogue per image" if args.protocol == "paper" else "image per dialogue"
        print(markdown_table({f"T2I ({direction})": results["t2i"]}))
    print(
        f"{results['n_dialogs']} dialogs ({results['n_skipped_missing_images']} skipped: "
        f"missing images); results in {args.out}"
    )
    return results


if __name__ == "__main__":
    main()
