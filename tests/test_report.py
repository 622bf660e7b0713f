import argparse

from data_prep.synthetic import write_split

from fromage.data.datamodule import CaptionDataModule, shard_list
from fromage.eval.attributes import shard_attributes
from fromage.train.report import evaluate, markdown, passes
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
