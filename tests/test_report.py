import argparse
import hashlib
import math

import torch
from data_prep.synthetic import write_split

from fromage.data.datamodule import CaptionDataModule, shard_list
from fromage.eval.attributes import shard_attributes
from fromage.train.report import evaluate, markdown, passes, provenance, tensors_digest
from fromage.train.run import train
from test_training import tiny_config
from tiny import tiny_fromage


def test_report_checks_every_held_out_pair_and_applies_the_bars(tmp_path):
    write_split(tmp_path / "train", n=16, per_shard=8, seed=0)
    write_split(tmp_path / "val", n=12, per_shard=12, seed=1)
    config = tiny_config(tmp_path, tmp_path / "runs", "trainer.max_steps=1")
    _, module = train(config, tiny_fromage("opt"))
    model = module.model
    data = CaptionDataModule(config.data, model.tokenizer, model.ret_id, model.vision.preprocess)
    truths = shard_attributes(shard_list(config.data.val_shards))
    result = evaluate(module, data, [1, 5], truths)
    metrics = result["metrics"]
    assert metrics["n_checked"] == 12 and len(result["examples"]["captions"]) == 4
    assert 0 <= metrics["caption_accuracy"] <= 100 and 0 <= metrics["retrieval_accuracy"] <= 100
    assert "Exact checks (12 held-out pairs)" in markdown(result, [1, 5])
    bars = argparse.Namespace(
        min_recall_over_chance=0.0, min_caption_accuracy=0.0, min_retrieval_accuracy=0.0
    )
    assert passes(metrics, bars)
    strict = argparse.Namespace(**{**vars(bars), "min_retrieval_accuracy": 0.6})
    assert not passes({**metrics, "retrieval_accuracy": 50.0}, strict)
    assert passes({**metrics, "retrieval_accuracy": 60.0}, strict)


def test_weights_digest_changes_with_one_ulp_of_one_weight_and_with_a_name():
    state = {"a": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), "b": torch.ones(2)}
    digest = tensors_digest(state)
    assert tensors_digest({name: t.clone() for name, t in state.items()}) == digest
    bumped = state["a"].clone()
    bumped[1, 2] = torch.nextafter(bumped[1, 2], torch.tensor(math.inf))
    assert tensors_digest({**state, "a": bumped}) != digest
    assert tensors_digest({"a": state["a"], "c": state["b"]}) != digest
    assert tensors_digest({**state, "b": state["b"].double()}) != digest


def test_provenance_records_the_weights_the_tower_file_the_libraries_and_threads(tmp_path):
    model = tiny_fromage("opt")
    tower = tmp_path / "tower.safetensors"
    tower.write_bytes(b"tower weights")
    record = provenance(model, str(tower))
    assert record["tower checkpoint"] == hashlib.sha256(b"tower weights").hexdigest()[:16]
    assert record["trained weights"] == tensors_digest(model.trainable_state_dict())
    assert record["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert record["torch threads"] == torch.get_num_threads()
    with torch.no_grad():
        model.image_to_shared.bias[0] += 1e-3
    assert provenance(model, None)["trained weights"] != record["trained weights"]
    assert "tower checkpoint" not in provenance(model, str(tmp_path / "missing"))
    shown = markdown(
        {
            "metrics": {"n_pairs": 2, **{f"{p}R@1": 0.0 for p in ("t2i_", "i2t_", "chance_")}},
            "examples": {"captions": [], "retrievals": []},
            "provenance": record,
        },
        [1],
    )
    assert f"- trained weights: {record['trained weights']}" in shown
