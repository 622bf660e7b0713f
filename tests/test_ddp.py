"""Several CPU processes (gloo) train and validate a tiny configured model as one process
would: Lightning DDP, and ``trainer=fsdp`` with the frozen LM and tower sharded."""

import re
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


def train_in_processes(
    processes: int, root, *overrides, trainer: str = "ddp", family: str = "opt"
) -> dict:
    """Train the tiny configured experiment (an LM of ``family``) with ``processes`` gloo
    processes of ``trainer`` (ddp, fsdp), on training shards of one process's micro-batch
    share each (so rank r's micro-batches, in rank order, are the same consecutive samples
    one process reads); returns the logged ``scalars``, the exported ``weights`` and what
    it ``printed``. A second call with the same arguments resumes the first's run."""
    micro_batch = 8
    shards = root / f"shards{processes}"
    write_split(shards / "train", n=48, per_shard=micro_batch // processes, seed=0)
    write_split(shards / "val", n=10, per_shard=10, seed=1)  # one shard for all ranks
    out = root / f"{trainer}-{family}-{processes}"
    arguments = configured_tiny_overrides(
        shards,
        root,  # the same tiny LM for every run of a family
        f"output_dir={out}",
        f"trainer={trainer}",
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
        family=family,
    )
    printed = train_demo(arguments)
    assert f"{micro_batch // processes} pairs per process" in printed
    return {
        "scalars": read_scalars(out / "demo"),
        "weights": load_file(out / "demo/pretrained" / WEIGHTS_FILE),
        "printed": printed,
    }


def logged_keys(run: dict) -> list[str]:
    return [k for k in run["scalars"] if k.startswith("train/") or "R@" in k]


def assert_same_run(run: dict, alone: dict, keys: list[str]) -> None:
    """The same logged values at the same steps, and the same exported weights."""
    for key in keys:
        expected = alone["scalars"][key]
        assert [step for step, _ in run["scalars"][key]] == [step for step, _ in expected], key
        got = [value for _, value in run["scalars"][key]]
        assert got == pytest.approx([v for _, v in expected], rel=1e-5, abs=1e-6), key
    assert run["weights"].keys() == alone["weights"].keys()
    for name, value in alone["weights"].items():
        torch.testing.assert_close(run["weights"][name], value, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """``family -> the one-process run`` that every multi-process run must equal."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}

    def alone(family: str) -> dict:
        if family not in runs:
            runs[family] = train_in_processes(1, root, family=family)
        return runs[family]

    alone.root = root
    return alone


@pytest.mark.slow  # about 2 min on 2 busy cores: two and four processes
def test_two_and_four_processes_take_the_same_steps_on_the_same_global_batch(one_process):
    """Global batch 16 as 2 accumulated micro-batches of 8: over 2 and 4 processes the
    logged losses, recall and trained weights are one process's (gradient clipping and
    the [RET] renormalisation included)."""
    alone = one_process("opt")
    logged = logged_keys(alone)
    assert {"train/loss", "train/contrastive", "train/caption_ce", "val/t2i_R@1"} <= set(logged)
    assert [s for s, _ in alone["scalars"]["train/loss"]] == [0, 1, 2]
    for w in (2, 4):
        assert_same_run(train_in_processes(w, one_process.root), alone, logged)


def held_fraction(printed: str) -> float:
    """The share of the LM's weights one sharded process said it holds."""
    held = re.search(r"each process holds .* of the LM's .* \((\d\.\d\d)\)", printed)
    assert held, "a sharded run prints the share of the LM each process holds"
    return float(held[1])


@pytest.mark.slow  # about 3 min on 2 busy cores: 2 + 2 + 4 sharded processes
def test_sharded_processes_train_as_one_and_resume_to_its_weights(one_process):
    """``trainer=fsdp`` with OPT (tied head): each of W processes holds 1/W of the LM and
    they log one process's losses and recall and export its weights; the 2-process run
    stops at step 2 and resumes from its checkpoint to the same weights."""
    alone = one_process("opt")
    root = one_process.root
    first = train_in_processes(2, root, "trainer.max_steps=2", trainer="fsdp")
    assert held_fraction(first["printed"]) == pytest.approx(0.5, abs=0.02)
    resumed = train_in_processes(2, root, trainer="fsdp")  # from step 2's checkpoint
    assert "Restored all states from the checkpoint" in resumed["printed"]
    # (the stopped run logged its epoch's end too: per-step values only)
    per_step = [k for k in logged_keys(alone) if not k.endswith("_epoch")]
    assert_same_run(resumed, alone, per_step)
    four = train_in_processes(4, root, trainer="fsdp")  # validation: 2, 2, 1, 1 batches
    assert held_fraction(four["printed"]) == pytest.approx(0.25, abs=0.02)
    assert_same_run(four, alone, logged_keys(alone))


@pytest.mark.slow  # about 1 min: an untied head (Llama), 2 sharded processes
def test_sharded_processes_with_an_untied_head_train_as_one(one_process):
    alone = one_process("llama")
    sharded = train_in_processes(2, one_process.root, trainer="fsdp", family="llama")
    assert "ret_output" in sharded["weights"]
    assert_same_run(sharded, alone, logged_keys(alone))
