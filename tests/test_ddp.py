"""Lightning DDP on CPU: two gloo processes train and validate a tiny configured model,
with contextual recall ranked by both processes and gathered."""

import subprocess
import sys

import pytest
import torch
from data_prep.synthetic import write_split, write_stories
from safetensors.torch import load_file

from fromage.config import compose
from fromage.model.load import load_model
from fromage.model.pretrained import WEIGHTS_FILE
from fromage.train.callbacks import contextual_recall_callback
from fromage.train.logs import read_scalars
from test_training import configured_tiny_overrides


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_trains_and_validates(tmp_path):
    write_split(tmp_path / "shards/train", n=32, per_shard=8, seed=0)
    write_split(tmp_path / "shards/val", n=16, per_shard=8, seed=1)  # one val shard per rank
    write_stories(tmp_path / "stories", n=5, seed=2, image_size=32)  # an odd count: 3 + 2
    overrides = configured_tiny_overrides(
        tmp_path / "shards",
        tmp_path,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        f"data.stories={tmp_path / 'stories'}",
        "data.stories_per_validation=5",
    )
    result = subprocess.run(
        [sys.executable, "-m", "fromage.train", "demo", *overrides],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "demo/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    weights = load_file(tmp_path / "demo/pretrained" / WEIGHTS_FILE)
    assert all(torch.isfinite(v).all() for v in weights.values())

    # the recall both processes logged at the last step is one process's over all stories
    logged = read_scalars(tmp_path / "demo")
    config = compose("demo", overrides)
    callback = contextual_recall_callback(config.data, config.recall_ks, config.seed)
    alone = callback.contextual_recall(load_model(tmp_path / "demo"))
    for setting, recalls in alone.items():
        slug = setting.replace(",", "").replace(" ", "_")
        for name, value in recalls.items():
            assert logged[f"val/ctx_{slug}_{name}"][-1][1] == pytest.approx(value)
