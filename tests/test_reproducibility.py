"""A seeded run repeats exactly: two trainings of the same experiment give bit-identical
trained weights, logged losses and held-out report numbers (what `make demo` relies on)."""

import pytest
import torch

from fromage.data.datamodule import CaptionDataModule, shard_list
from fromage.eval.attributes import shard_attributes
from fromage.train.logs import read_scalars
from fromage.train.report import evaluate, tensors_digest
from fromage.train.run import train
from test_training import tiny_config
from tiny import tiny_fromage


def train_and_report(shards, out):
    config = tiny_config(
        shards, out, "trainer.deterministic=true", "data.num_workers=1", "trainer.max_steps=2"
    )
    _, module = train(config, tiny_fromage("opt"))
    model = module.model
    data = CaptionDataModule(config.data, model.tokenizer, model.ret_id, model.vision.preprocess)
    truths = shard_attributes(shard_list(config.data.val_shards))
    result = evaluate(module, data, [1, 5], truths)
    losses = read_scalars(out / config.name)["train/loss"]
    return model.trainable_state_dict(), losses, result


@pytest.fixture
def deterministic_mode_restored():
    """Lightning turns PyTorch's deterministic mode on for the whole process."""
    yield
    torch.use_deterministic_algorithms(False)


def test_two_seeded_runs_give_the_same_weights_losses_and_report(
    shards, tmp_path, deterministic_mode_restored
):
    weights_a, losses_a, report_a = train_and_report(shards, tmp_path / "a")
    weights_b, losses_b, report_b = train_and_report(shards, tmp_path / "b")
    assert torch.are_deterministic_algorithms_enabled()
    assert tensors_digest(weights_a) == tensors_digest(weights_b)
    untrained = tiny_fromage("opt").trainable_state_dict()
    assert tensors_digest(weights_a) != tensors_digest(untrained)  # it did train
    assert len(losses_a) == 2 and losses_a == losses_b
    assert report_a == report_b
