"""VisDial v1.0 val (the paper's Table 2): answer ranking (IT2T) and image retrieval (T2I).

IT2T: for every round, the 100 candidate answers are ranked by their summed
log-likelihood given the image and the dialogue so far, as the release prompts it
(``Q: q1?\\nA: a1\\n...Q: qr?\\nA:``); all candidates of a round are scored in one
batched LM pass. Reported: MRR, R@1/5/10, mean rank over all rounds, and NDCG over the
densely annotated round of each dialog (k = number of relevant answers).
T2I: ``caption. Q: q1? A: a1. ... [RET]`` retrieves among the split's images.

    python -m fromage.eval.visdial MODEL --data data/visdial/val --out runs/eval/visdial.json
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional.retrieval import retrieval_normalized_dcg

from fromage.data.image_sources import ImageRecord, open_image
from fromage.eval.common import eval_parser, split_bank
from fromage.infer.bank import ImageBank, read_jsonl
from fromage.infer.bank_build import chunks
from fromage.infer.scoring import log_likelihood, retrieval_queries
from fromage.metrics import recall_at_k, target_ranks
from fromage.model.fromage import FromageModel
from fromage.model.load import load_model
from fromage.model.tokens import RET_TOKEN
from fromage.reporting import markdown_table, write_json


def answer_context(dialog: dict, round_index: int) -> str:
    """The dialogue up to the question of ``round_index``, ending where the answer goes."""
    lines = []
    for past in dialog["rounds"][:round_index]:
        lines += [f"Q: {past['question']}?", f"A: {past['answer']}"]
    lines.append(f"Q: {dialog['rounds'][round_index]['question']}?")
    return "\n".join(lines) + "\nA:"


def retrieval_prompt(dialog: dict) -> str:
    turns = " ".join(f"Q: {r['question']}? A: {r['answer']}." for r in dialog["rounds"])
    return f"{dialog['caption']}. {turns}{RET_TOKEN}"


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


@torch.no_grad()
def evaluate_visdial(
    model: FromageModel,
    dialogs: Sequence[dict],
    bank: ImageBank,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 16,
) -> dict:
    usable = [d for d in dialogs if d["image_id"] in bank]
    scores, gt, dense_scores, dense_relevance = [], [], [], []
    for dialog in usable:
        image = open_image(bank.source_of(dialog["image_id"]))
        for index, round_ in enumerate(dialog["rounds"]):
            options = [" " + option for option in round_["options"]]
            scores.append(log_likelihood(model, [image, answer_context(dialog, index)], options))
            gt.append(round_["gt_index"])
            if dialog["dense"] is not None and dialog["dense"]["round"] == index:
                dense_scores.append(scores[-1])
                dense_relevance.append(torch.tensor(dialog["dense"]["relevance"]))
    it2t = answer_metrics(gt_ranks(torch.stack(scores), torch.tensor(gt)), ks)
    if dense_scores:
        it2t["NDCG"] = ndcg(torch.stack(dense_scores), torch.stack(dense_relevance))
    t2i_ranks = [
        bank.ranks(
            retrieval_queries(model, [[retrieval_prompt(d)] for d in batch]),
            [d["image_id"] for d in batch],
        )
        for batch in chunks(usable, batch_size)
    ]
    return {
        "n_dialogs": len(usable),
        "n_skipped_missing_images": len(dialogs) - len(usable),
        "n_rounds": len(gt),
        "it2t": it2t,
        "t2i": recall_at_k(torch.cat(t2i_ranks), ks),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = eval_parser(__doc__, "output of data_prep/visdial.py", "dialogs per T2I LM forward")
    parser.add_argument("--max-dialogs", type=int, help="evaluate only the first N dialogs")
    args = parser.parse_args(argv)

    model = load_model(args.model, args.override)
    dialogs = read_jsonl(args.data / "dialogs.jsonl")[: args.max_dialogs]
    images = [ImageRecord(d["image_id"], d["image"]) for d in dialogs if d["image"]]
    bank = split_bank(model, images, args.data / "banks")
    results = evaluate_visdial(model, dialogs, bank, batch_size=args.batch_size)
    results = {"model": str(args.model), **results}
    write_json(args.out, results)
    print(markdown_table({"IT2T (answer ranking)": results["it2t"]}))
    print(markdown_table({"T2I (image retrieval)": results["t2i"]}))
    print(
        f"{results['n_dialogs']} dialogs, {results['n_rounds']} rounds "
        f"({results['n_skipped_missing_images']} dialogs skipped: missing images); results in {args.out}"
    )
    return results


if __name__ == "__main__":
    main()
