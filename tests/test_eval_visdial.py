import json
import math

import pytest
import torch
import torch.nn.functional as F
from data_prep.fixtures import write_visdial
from data_prep.visdial import resolve_dialogs

from fromage.eval.visdial import answer_context, answer_metrics, gt_ranks, main, ndcg
from fromage.infer.bank import append_to_bank
from fromage.infer.bank_build import embedder_fingerprint
from test_eval_vist import constant_query_model


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
    context = answer_context(dialogs[0], 2)
    assert context.startswith(f"Q: {dialogs[0]['rounds'][0]['question']}?\nA: ")
    assert context.endswith(f"Q: {dialogs[0]['rounds'][2]['question']}?\nA:")


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
    results = main(
        [str(tmp_path / "model"), "--data", str(root / "val"), "--out", str(tmp_path / "v.json")]
    )
    assert (results["n_dialogs"], results["n_skipped_missing_images"], results["n_rounds"]) == (
        2,
        1,
        20,
    )
    assert results["t2i"] == pytest.approx({"R@1": 50.0, "R@5": 100.0, "R@10": 100.0})

    # IT2T: the LM's final state is the constant u, so every next token has the same
    # distribution and an answer's score is the sum of its tokens' log-probabilities.
    u = model.lm.model.decoder.final_layer_norm.bias
    log_p = model.token_logits(u[None])[0].log_softmax(-1)
    ranks = []
    for dialog in dialogs[:2]:
        for round_ in dialog["rounds"]:
            option_scores = torch.stack(
                [
                    log_p[model.tokenizer(" " + o, add_special_tokens=False).input_ids].sum()
                    for o in round_["options"]
                ]
            )
            ranks.append(int((option_scores >= option_scores[round_["gt_index"]] - 1e-4).sum()))
    assert results["it2t"]["MRR"] == pytest.approx(sum(1 / r for r in ranks) / len(ranks), rel=1e-4)
    assert results["it2t"]["mean rank"] == pytest.approx(sum(ranks) / len(ranks))
    assert 0 < results["it2t"]["NDCG"] <= 1
