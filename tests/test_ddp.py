"""Lightning DDP on CPU (gloo): several processes train and validate a tiny configured
model as one process would."""

import subprocess
import sys

import pytest
import torch
from data_prep.synthetic import write_split, write_stories
from safetensors.torch import load_file

from fromage.config import compose
from fromage.data.datamodule import CaptionDataModule
from fromage.model.load import load_model
from fromage.model.pretrained import WEIGHTS_FILE
from fromage.train.callbacks import contextual_recall_callback
from fromage.train.logs import read_scalars
from fromage.train.module import FromageLitModule
from fromage.train.report import evaluate
from test_training import configured_tiny_overrides


def train_demo(overrides: list[str]) -> str:
    """``python -m fromage.train demo OVERRIDES`` (Lightning starts the other processes
    itself); returns what it printed."""
    result = subprocess.run(
        [sys.executable, "-m", "fromage.train", "demo", *overrides],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_ddp_with_three_cpu_processes_on_two_unequal_validation_shards(tmp_path):
    """Validation shards of 10 and 4 pairs for 3 processes: split by samples (5, 5, 4),
    so the processes hold 2, 2 and 1 validation batches; nothing hangs, and the recall
    they log is one process's over the whole validation set."""
    write_split(tmp_path / "shards/train", n=36, per_shard=4, seed=0)  # 3 shards per rank
    write_split(tmp_path / "shards/val", n=14, per_shard=10, seed=1)
    write_stories(tmp_path / "stories", n=5, seed=2, image_size=32)  # 2 + 2 + 1
    overrides = configured_tiny_overrides(
        tmp_path / "shards",
        tmp_path,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=3",
        "trainer.precision=32-true",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1.0",
        "data.batch_size=12",  # global: 4 per process
        f"data.stories={tmp_path / 'stories'}",
        "data.stories_per_validation=5",
    )
    train_demo(overrides)
    checkpoint = torch.load(tmp_path / "demo/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    weights = load_file(tmp_path / "demo/pretrained" / WEIGHTS_FILE)
    assert all(torch.isfinite(v).all() for v in weights.values())

    logged = read_scalars(tmp_path / "demo")
    config = compose("demo", overrides)
    model = load_model(tmp_path / "demo")
    data = CaptionDataModule(config.data, model.tokenizer, model.ret_id, model.vision.preprocess)
    paired = evaluate(FromageLitModule(config, model), data, list(config.recall_ks))["metrics"]
    assert paired["n_pairs"] == 14
    for direction in ("t2i", "i2t"):
        for k in config.recall_ks:
            name = f"{direction}_R@{k}"
            assert logged[f"val/{name}"][-1][1] == pytest.approx(paired[name])
    callback = contextual_recall_callback(config.data, config.recall_ks, config.seed)
    for setting, recalls in callback.contextual_recall(model).items():
        slug = setting.replace(",", "").replace(" ", "_")
        for name, value in recalls.items():
            assert logged[f"val/ctx_{slug}_{name}"][-1][1] == pytest.approx(value)


def train_in_processes(processes: int, root, *overrides) -> dict:
    """Train the tiny configured experiment with ``processes`` gloo DDP processes, on
    training shards of one process's micro-batch share each (so rank r's micro-batches,
    in rank order, are the same consecutive samples one process reads); returns
    ``{"scalars": logged scalars, "weights": exported weights}``."""
    micro_batch = 8
    shards = root / f"shards{processes}"
    write_split(shards / "train", n=48, per_shard=micro_batch // processes, seed=0)
    write_split(shards / "val", n=10, per_shard=10, seed=1)  # one shard for all ranks
    out = root / f"w{processes}"
    arguments = configured_tiny_overrides(
        shards,
        root,  # the same tiny LM for every run
        f"output_dir={out}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        f"trainer.devices={processes}",
        "trainer.precision=32-true",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1.0",
        f"data.batch_size={2 * micro_batch}",
        f"data.per_device_batch_size={micro_batch // processes}",  # accumulate 2
        "data.shuffle_buffer=0",
        "loss.concat_captions_prob=0.5",
        "trainer.gradient_clip_val=0.05",  # small enough to clip
        *overrides,
    )
    printed = train_demo(arguments)
    assert f"{micro_batch // processes} pairs per process" in printed
    return {
        "scalars": read_scalars(out / "demo"),
        "weights": load_file(out / "demo/pretrained" / WEIGHTS_FILE),
    }


@pytest.mark.slow  # about 4 min on 2 busy cores: seven processes in all
def test_one_two_and_four_processes_take_the_same_steps_on_the_same_global_batch(tmp_path):
    """Global batch 16 as 2 accumulated micro-batches of 8: over 1, 2 and 4 processes the
    logged losses, recall and trained weights are one process's (gradient clipping and
    the [RET] renormalisation included)."""
    runs = {w: train_in_processes(w, tmp_path) for w in (1, 2, 4)}
    alone = runs[1]
    logged = [k for k in alone["scalars"] if k.startswith("train/") or "R@" in k]
    assert {"train/loss", "train/contrastive", "train/caption_ce", "val/t2i_R@1"} <= set(logged)
    assert [s for s, _ in alone["scalars"]["train/loss"]] == [0, 1, 2]
    for w in (2, 4):
        for key in logged:
            expected = [value for _, value in alone["scalars"][key]]
            got = [value for _, value in runs[w]["scalars"][key]]
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), (w, key)
        for name, value in alone["weights"].items():
            torch.testing.assert_close(runs[w]["weights"][name], value, rtol=1e-5, atol=1e-6)
