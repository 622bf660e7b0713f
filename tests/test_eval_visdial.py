import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from data_prep.fixtures import write_visdial
from data_prep.visdial import resolve_dialogs
from PIL import Image

from fromage.eval.common import ProtocolEmbedder
from fromage.eval.visdial import (
    NDCG_ROUND_SHIFT,
    answer_metrics,
    answer_prompt,
    check_dialogs,
    dense_rows,
    dialogue_so_far,
    gt_ranks,
    image_to_text_ranks,
    main,
    ndcg,
    own_position_scores,
    paper_token_ids,
    retrieval_prompt,
)
from fromage.infer.bank import append_to_bank
from fromage.infer.bank_build import FromageImageEmbedder, embedder_fingerprint
from fromage.infer.scoring import log_likelihood
from test_eval_vist import constant_query_model
from tiny import random_pixels, tiny_fromage

DIALOG = {
    "caption": "a red circle at the top left",
    "rounds": [
        {"question": "what colour is it", "answer": "red", "options": ["blue", "red"]},
        {"question": "where is it", "answer": "top left", "options": ["top left", "no"]},
    ],
}


@pytest.fixture(scope="module")
def visdial(tmp_path_factory):
    root = tmp_path_factory.mktemp("visdial")
    dialog_file, dense_file = write_visdial(root / "raw", n_dialogs=3)
    official = json.loads(dialog_file.read_text())
    (root / "raw/VisualDialog_val2018" / "VisualDialog_val2018_000000185002.jpg").unlink()
    dialogs = resolve_dialogs(
        official, json.loads(dense_file.read_text()), root / "raw/VisualDialog_val2018"
    )
    (root / "val").mkdir()
    (root / "val/dialogs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dialogs))
    return root, official, dialogs


@pytest.fixture(scope="module")
def opt_like():
    """A tiny OPT-like model whose tokenizer puts <s> (id 0) before every text it encodes."""
    model = tiny_fromage("opt", seed=3).eval()
    assert model.tokenizer("red").input_ids[0] == model.tokenizer.convert_tokens_to_ids("<s>")
    return model


def test_dialogs_resolve_strings_images_and_dense_rounds(visdial):
    root, official, dialogs = visdial
    first = official["data"]["dialogs"][0]["dialog"][4]
    assert dialogs[0]["rounds"][4]["answer"] == official["data"]["answers"][first["answer"]]
    assert (
        dialogs[0]["rounds"][4]["options"][first["gt_index"]] == dialogs[0]["rounds"][4]["answer"]
    )
    assert [d["image"] is None for d in dialogs] == [False, False, True]
    dense = json.loads((root / "raw/visdial_1.0_val_dense_annotations.json").read_text())[1]
    assert dialogs[1]["dense"]["round"] == dense["round_id"] - 1
    context = dialogue_so_far(dialogs[0], 2)
    assert context.startswith(f"Q: {dialogs[0]['rounds'][0]['question']}?\nA: ")
    assert context.endswith(f"Q: {dialogs[0]['rounds'][2]['question']}?\nA:")


def test_a_dense_round_past_its_dialog_and_a_round_without_answer_are_refused(visdial, tmp_path):
    root, official, dialogs = visdial
    short = copy.deepcopy(dialogs)
    short[0]["rounds"] = short[0]["rounds"][:5]
    short[0]["dense"]["round"] = 5  # round 6 of a 5-round dialog: the next dialog's rows
    (tmp_path / "dialogs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in short))
    image_id = short[0]["image_id"]
    with pytest.raises(ValueError, match=rf"image {image_id} is for round 6, but .* has 5 rounds"):
        main(["no-model", "--data", str(tmp_path), "--out", str(tmp_path / "out.json")])
    unanswered = copy.deepcopy(official)
    del unanswered["data"]["dialogs"][1]["dialog"][2]["answer"]
    image_id = unanswered["data"]["dialogs"][1]["image_id"]
    with pytest.raises(ValueError, match=rf"dialog of image {image_id}, round 3: no \['answer'\]"):
        resolve_dialogs(unanswered, [], root / "raw/VisualDialog_val2018")
    del short[1]["rounds"][2]["answer"]
    short[0]["dense"] = None
    with pytest.raises(
        ValueError, match=rf"image {short[1]['image_id']}, round 3 has no \['answer'\]"
    ):
        check_dialogs(short)


def test_prompt_strings_of_both_protocols():
    history = "Q: what colour is it?\nA: red\nQ: where is it?\nA:"
    assert answer_prompt(DIALOG, 1, "paper") == (history + " ", ["top left", "no"])
    assert answer_prompt(DIALOG, 1, "corrected") == (history, [" top left", " no"])
    assert answer_prompt(DIALOG, 0, "paper")[0] == "Q: what colour is it?\nA: "
    turns = "Q: what colour is it? A: red. Q: where is it? A: top left."
    assert retrieval_prompt(DIALOG, "paper") == turns + "[RET]"
    assert retrieval_prompt(DIALOG, "corrected") == f"a red circle at the top left. {turns}[RET]"


def test_paper_token_ids_put_bos_before_context_answers_and_retrieval_text(opt_like):
    tokenizer, bos = opt_like.tokenizer, 0

    def plain(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    context, answers = answer_prompt(DIALOG, 1, "paper")
    assert paper_token_ids(opt_like, [context]).input_ids[0].tolist() == [bos, *plain(context)]
    assert plain(context)[-1] == plain(" ")[0]  # the trailing space is a token of its own
    batch = paper_token_ids(opt_like, answers)  # ["top left", "no"], right-padded
    lengths = [1 + len(plain(a)) for a in answers]
    assert batch.attention_mask.sum(1).tolist() == lengths
    for row, answer, n in zip(batch.input_ids.tolist(), answers, lengths, strict=True):
        assert row[:n] == [bos, *plain(answer)]
    assert plain("top left") != plain(" top left")  # why the two protocols' tokens differ
    query = paper_token_ids(opt_like, [retrieval_prompt(DIALOG, "paper")]).input_ids[0]
    assert query[0] == bos and query[-1] == opt_like.ret_id
    assert query[1:-1].tolist() == plain(retrieval_prompt(DIALOG, "paper").removesuffix("[RET]"))


def full_pass_logits(model, visual, ids):
    """Logits of one unpadded, uncached pass over [visual tokens, ids], (L, V)."""
    embeds = torch.cat([visual.to(model.lm_dtype), model.embed_ids(torch.tensor(ids))])
    return model.token_logits(model.lm.base_model(inputs_embeds=embeds[None]).last_hidden_state[0])


@torch.no_grad()
def test_paper_scores_each_token_at_its_own_position_and_corrected_the_next(opt_like):
    tokenizer, bos = opt_like.tokenizer, 0
    pixels = random_pixels(1, seed=4)
    visual = opt_like.visual_tokens(opt_like.image_features(pixels))[0]  # (1, d_emb)
    context = "Q: what colour is it?\nA: "
    answers = ["red", "a blue star at the top left", "no"]
    context_ids = [bos, *tokenizer(context, add_special_tokens=False).input_ids]
    scores = own_position_scores(opt_like, visual, context, answers)
    for score, answer in zip(scores, answers, strict=True):
        answer_ids = [bos, *tokenizer(answer, add_special_tokens=False).input_ids]
        logits = full_pass_logits(opt_like, visual, context_ids + answer_ids)
        start = 1 + len(context_ids)  # the answer's BOS
        # the release's loss: cross-entropy of logits[t] against the token AT t (unshifted)
        own = -F.cross_entropy(logits[start:], torch.tensor(answer_ids), reduction="sum")
        next_token = -F.cross_entropy(
            logits[start - 1 : -1], torch.tensor(answer_ids), reduction="sum"
        )
        assert float(score) == pytest.approx(float(own), abs=1e-4)
        assert abs(float(own - next_token)) > 1e-2  # the test tells the two apart

    corrected_context, corrected_answers = answer_prompt(DIALOG, 0, "corrected")
    corrected = log_likelihood(opt_like, [pixels[0], corrected_context], corrected_answers)
    context_ids = [bos, *tokenizer(corrected_context, add_special_tokens=False).input_ids]
    for score, answer in zip(corrected, corrected_answers, strict=True):
        answer_ids = tokenizer(answer, add_special_tokens=False).input_ids  # no BOS
        logits = full_pass_logits(opt_like, visual, context_ids + answer_ids)
        start = 1 + len(context_ids)
        next_token = -F.cross_entropy(
            logits[start - 1 : -1], torch.tensor(answer_ids), reduction="sum"
        )
        assert float(score) == pytest.approx(float(next_token), abs=1e-4)


def test_answer_metrics_and_ndcg_on_hand_computed_values():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.8, 0.1, 0.3, 0.7]])
    ranks = gt_ranks(scores, torch.tensor([1, 2]))
    assert ranks.tolist() == [1, 3]
    metrics = answer_metrics(ranks, ks=(1, 2))
    assert metrics["MRR"] == pytest.approx((1 + 1 / 3) / 2)
    assert (metrics["R@1"], metrics["R@2"], metrics["mean rank"]) == (50.0, 50.0, 2.0)
    # relevance 1 at option 0 and 0.5 at option 2; the model puts option 2 first: k = 2
    relevance = torch.tensor([[1.0, 0.0, 0.5, 0.0]])
    dcg = 0.5 / math.log2(2) + 1.0 / math.log2(3)
    ideal = 1.0 / math.log2(2) + 0.5 / math.log2(3)
    assert ndcg(torch.tensor([[0.5, 0.1, 0.9, 0.0]]), relevance) == pytest.approx(dcg / ideal)


def test_paper_ndcg_reads_the_next_round_and_the_next_dialog_after_round_10():
    relevance = [1.0, 0.5, 0.0, 0.0]
    # dense rounds (0-based) 3, 9, none, 9 over 4 dialogs of 10 rounds (rows 0..39)
    dialogs = [
        {"rounds": [{}] * 10, "dense": None if r is None else {"round": r, "relevance": relevance}}
        for r in (3, 9, None, 9)
    ]
    assert [row for row, _ in dense_rows(dialogs, 40, NDCG_ROUND_SHIFT["corrected"])] == [3, 19, 39]
    # the release: round 4 of dialog 0, round 1 of dialog 2; dialog 3's pair is past the end
    assert [row for row, _ in dense_rows(dialogs, 40, NDCG_ROUND_SHIFT["paper"])] == [4, 20]

    scores = torch.zeros(40, 4)
    scores[[3, 19, 39]] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # the annotated rounds: ideal order
    scores[[4, 20]] = torch.tensor([3.0, 4.0, 2.0, 1.0])  # the next rounds: top two swapped
    swapped = (0.5 + 1 / math.log2(3)) / (1 + 0.5 / math.log2(3))
    for protocol, expected in [("corrected", 1.0), ("paper", swapped)]:
        rows, rel = zip(*dense_rows(dialogs, 40, NDCG_ROUND_SHIFT[protocol]), strict=True)
        assert ndcg(scores[list(rows)], torch.tensor(rel)) == pytest.approx(expected)


def test_paper_t2i_ranks_dialogues_per_image_not_images_per_dialogue():
    # similarity[i, j] of image i and dialogue j
    similarity = torch.tensor([[0.9, 0.8, 0.1], [0.95, 0.5, 0.0], [0.0, 0.0, 0.3]])
    images, texts = torch.eye(3), similarity.T  # images @ texts.T == similarity
    assert image_to_text_ranks(images, texts).tolist() == [0, 1, 0]
    # text-to-image would be [1, 1, 0]: dialogue 0 prefers image 1
    assert image_to_text_ranks(texts, images).tolist() == [1, 1, 0]
    # the release leaves image embeddings unnormalised: a row's scale changes nothing
    scaled = images * torch.tensor([[5.0], [0.1], [2.0]])
    assert image_to_text_ranks(scaled, texts).tolist() == [0, 1, 0]


def test_paper_images_are_squashed_to_224_before_preprocessing(opt_like):
    wide = Image.new("RGB", (448, 112), "red")
    wide.paste((0, 0, 255), (0, 0, 112, 112))  # a blue square at the left
    embedder = ProtocolEmbedder(FromageImageEmbedder(opt_like), "paper")
    squashed = embedder.preprocess(wide)
    # squashed, the blue quarter stays a quarter (the crop would keep the red centre only)
    expected = opt_like.vision.preprocess(wide.resize((224, 224)))
    assert torch.equal(squashed, expected)
    assert not torch.allclose(squashed, opt_like.vision.preprocess(wide))
    blue = squashed[2] > squashed[0]  # (H, W) pixels bluer than red
    assert blue.float().mean() == pytest.approx(0.25, abs=0.05)


def test_visdial_end_to_end_matches_the_known_answers(visdial, tmp_path):
    root, _, dialogs = visdial
    model, q = constant_query_model(tmp_path)
    # T2I: every [RET] query is q; dialog 0's image scores 0.2 and dialog 1's 0.9 with q.
    scores = torch.tensor([[0.2], [0.9]])
    other = F.normalize(torch.randn(2, q.shape[0]) - q, dim=-1)
    other = F.normalize(other - (other @ q)[:, None] * q, dim=-1)
    append_to_bank(
        root / "val/banks" / embedder_fingerprint(model),
        scores * q + (1 - scores**2).sqrt() * other,
        [dialogs[0]["image_id"], dialogs[1]["image_id"]],
        [dialogs[0]["image"], dialogs[1]["image"]],
        embedder_fingerprint(model),
    )
    args = [str(tmp_path / "model"), "--data", str(root / "val")]
    corrected = main([*args, "--out", str(tmp_path / "c.json"), "--protocol", "corrected"])
    paper = main([*args, "--out", str(tmp_path / "p.json")])  # the default protocol
    assert paper["protocol"] == "paper"
    for results in (corrected, paper):
        assert (results["n_dialogs"], results["n_skipped_missing_images"]) == (2, 1)
        assert results["n_rounds"] == 20
    assert corrected["t2i"] == pytest.approx({"R@1": 50.0, "R@5": 100.0, "R@10": 100.0})
    # the paper ranks the 2 dialogues per image: all queries are q, so each image scores
    # both dialogues the same and the tie counts against the right one
    assert paper["t2i"] == pytest.approx({"R@1": 0.0, "R@5": 100.0, "R@10": 100.0})
    t2i_only = main([*args, "--out", str(tmp_path / "t.json"), "--tasks", "t2i"])
    assert "it2t" not in t2i_only and t2i_only["t2i"] == paper["t2i"]

    # IT2T: the LM's final state is the constant u, so every position has the same
    # distribution and an answer's score is the sum of its tokens' log-probabilities:
    # corrected " answer" without BOS, paper "answer" with BOS.
    u = model.lm.model.decoder.final_layer_norm.bias
    log_p = model.token_logits(u[None])[0].log_softmax(-1)
    tokenizer = model.tokenizer
    for results, ids, shift in [
        (corrected, lambda o: tokenizer(" " + o, add_special_tokens=False).input_ids, 0),
        (paper, lambda o: tokenizer(o).input_ids, 1),
    ]:
        ranks, rows = [], []
        for dialog in dialogs[:2]:
            for round_ in dialog["rounds"]:
                option_scores = torch.stack([log_p[ids(o)].sum() for o in round_["options"]])
                ranks.append(int((option_scores >= option_scores[round_["gt_index"]] - 1e-4).sum()))
                rows.append(option_scores)
        expected_mrr = sum(1 / r for r in ranks) / len(ranks)
        assert results["it2t"]["MRR"] == pytest.approx(expected_mrr, rel=1e-4)
        assert results["it2t"]["mean rank"] == pytest.approx(sum(ranks) / len(ranks))
        # NDCG: dialog i's dense relevance against row 10 i + round (+ 1 for the paper)
        dense = [
            (10 * i + d["dense"]["round"] + shift, d["dense"]["relevance"])
            for i, d in enumerate(dialogs[:2])
        ]
        dense = [(row, rel) for row, rel in dense if row < 20]
        assert results["n_ndcg_rounds"] == len(dense)
        expected_ndcg = ndcg(
            torch.stack([rows[row] for row, _ in dense]), torch.tensor([rel for _, rel in dense])
        )
        assert results["it2t"]["NDCG"] == pytest.approx(expected_ndcg, abs=1e-4)
