import dataclasses
import json
import math
import random
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from data_prep.pairs import main as pairs_main
from data_prep.synthetic import make_pair, write_stories
from safetensors.torch import load_file

from fromage.config import compose
from fromage.data.image_sources import ImageLoadError
from fromage.eval.vist import main as vist_main
from fromage.infer.bank import ImageBank
from fromage.infer.scoring import retrieval_queries
from fromage.model.fromage import FromageModel
from fromage.model.load import load_model, trained_weights
from fromage.model.objectives import contrastive_loss
from fromage.model.pretrained import WEIGHTS_FILE, read_checkpoint
from fromage.paths import RunPaths
from fromage.train.batching import BatchSizeError, plan_batches
from fromage.train.callbacks import contextual_recall_callback
from fromage.train.distributed import gather_with_global_grad
from fromage.train.finetune import finetune
from fromage.train.logs import read_scalars
from fromage.train.module import FromageLitModule
from fromage.train.report import main as report_main
from fromage.train.run import train, warm_start
from tiny import tiny_fromage, tiny_model_config


def tiny_config_overrides(shards) -> list[str]:
    """A few-second run of the demo experiment on the shards under ``shards``."""
    return [
        f"data.train_shards={shards}/train",
        f"data.val_shards={shards}/val",
        "data.stories_per_validation=0",  # contextual recall: its own tests
        "data.batch_size=4",
        "data.num_workers=0",
        "data.max_len=16",
        "trainer.max_steps=4",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
    ]


def tiny_config(shards, out, *overrides):
    return compose("demo", [*tiny_config_overrides(shards), f"output_dir={out}", *overrides])


def queries(model):
    return retrieval_queries(model, [["a red circle at the top left[RET]"], ["a blue cross[RET]"]])


def test_fit_writes_trainable_only_checkpoints_that_reload_and_resume(shards, tmp_path):
    config = tiny_config(shards, tmp_path)
    trainer, module = train(config, tiny_fromage("opt"))
    assert trainer.global_step == 4
    assert (
        "val/t2i_R@1" in trainer.callback_metrics
        and "train/contrastive" in trainer.callback_metrics
    )

    last = tmp_path / "demo" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    trainable = {f"model.{k}" for k in module.model.trainable_state_dict()}
    assert set(checkpoint["state_dict"]) == trainable
    assert checkpoint["global_step"] == 4 and checkpoint["optimizer_states"]

    fresh = tiny_fromage("opt")
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    assert not torch.allclose(queries(fresh), queries(module.model))
    FromageLitModule(config, fresh).on_load_checkpoint(read_checkpoint(last), str(last))
    assert torch.allclose(queries(fresh), queries(module.model), atol=1e-6)

    resumed_config = tiny_config(shards, tmp_path, "trainer.max_steps=6")
    resumed, _ = train(resumed_config, tiny_fromage("opt"))
    assert resumed.global_step == 6
    assert torch.load(last, weights_only=True)["global_step"] == 6

    scalars = read_scalars(tmp_path / "demo")  # two logger versions: before and after resuming
    assert [step for step, _ in scalars["train/loss"]] == list(range(6))
    assert [step for step, _ in scalars["val/t2i_R@1"]] == [1, 3, 5]
    assert all(0 <= value <= 100 for _, value in scalars["val/t2i_R@5"])  # percent


def test_checkpoint_of_another_model_is_refused(shards, tmp_path):
    config = tiny_config(shards, tmp_path, "trainer.max_steps=2")
    train(config, tiny_fromage("opt"))
    last = tmp_path / "demo" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="does not fit this model"):
        FromageLitModule(config, tiny_fromage("opt", n_visual_tokens=3)).on_load_checkpoint(
            read_checkpoint(last), str(last)
        )
    other_tower = tiny_config(shards, tmp_path, "trainer.max_steps=2", "model.vision.init_seed=7")
    with pytest.raises(ValueError, match=r"another model config: \['vision.init_seed: 0 -> 7'\]"):
        FromageLitModule(other_tower, tiny_fromage("opt")).on_load_checkpoint(
            read_checkpoint(last), str(last)
        )


def test_a_truncated_last_checkpoint_says_how_to_start_over_or_resume(shards, tmp_path):
    config = tiny_config(shards, tmp_path)
    last = RunPaths.of(config).last_checkpoint
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, last)
    last.write_bytes(last.read_bytes()[:2000])
    with pytest.raises(
        ValueError, match=r"last\.ckpt is cut short or damaged .*to start over delete it"
    ):
        train(config, tiny_fromage("opt"))


def configured_tiny_overrides(shards, tmp_path, *overrides, family: str = "opt") -> list[str]:
    """The demo experiment's overrides for a model config that names a saved tiny LM (of
    ``family``, under ``tmp_path``) and a seeded timm tower."""
    model = tiny_model_config(tmp_path / f"lm-{family}", family)
    return [
        *tiny_config_overrides(shards),
        f"output_dir={tmp_path}",
        "trainer.max_steps=2",
        f"model.lm.name={model.lm.name}",
        f"model.vision.name={model.vision.name}",
        "model.vision.backend=timm",
        "model.vision.pretrained=false",
        "model.vision.checkpoint=null",  # a random tiny tower, not the demo's
        f"model.vision.image_size={model.vision.image_size}",
        *overrides,
    ]


def configured_tiny(shards, tmp_path, *overrides):
    return compose("demo", configured_tiny_overrides(shards, tmp_path, *overrides))


def test_report_of_a_model_run_another_way_goes_beside_the_plain_one(shards, tmp_path):
    overrides = configured_tiny_overrides(shards, tmp_path)
    train(compose("demo", overrides))
    assert report_main(["demo", *overrides]) == 0
    run = RunPaths.of(compose("demo", overrides)).root
    plain = json.loads((run / "report.json").read_text())
    assert report_main(["demo", *overrides, "model.pack_sequences=false"]) == 0
    assert json.loads((run / "report.json").read_text()) == plain  # not replaced
    padded = json.loads((run / "report[pack_sequences=false].json").read_text())
    assert (run / "report[pack_sequences=false].md").is_file()
    assert padded["metrics"]["t2i_R@1"] == pytest.approx(plain["metrics"]["t2i_R@1"])


def test_training_a_configured_model_leaves_a_loadable_pretrained_directory(shards, tmp_path):
    config = configured_tiny(shards, tmp_path)
    _, module = train(config)
    loaded = load_model(RunPaths.of(config).pretrained)
    assert torch.equal(queries(loaded), queries(module.model))
    assert not torch.equal(queries(loaded), queries(FromageModel.from_config(config.model)))


class TwoTowers(torch.nn.Module):
    """Stand-ins for the trained maps: text and image rows to normalised embeddings, and
    a trained logit scale, so DDP averages their gradients as it does the model's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.text = torch.nn.Linear(6, 8)
        self.image = torch.nn.Linear(6, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, text, image, gather=None):
        normed = torch.nn.functional.normalize
        return contrastive_loss(
            normed(self.text(text), dim=-1),
            normed(self.image(image), dim=-1),
            self.logit_scale,
            gather,
        )


def _contrast_on_rank(rank, world, port, text, image, results):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    rows = [slice(0, 3), slice(3, 5)][rank]  # uneven local batches: 3 and 2
    towers = torch.nn.parallel.DistributedDataParallel(TwoTowers())
    out = towers(text[rows], image[rows], gather_with_global_grad)
    out.loss.backward()  # DDP averages the two ranks' gradients
    results[rank] = (out.loss.item(), {n: p.grad for n, p in towers.module.named_parameters()})
    dist.destroy_process_group()


def test_infonce_under_two_gloo_processes_has_the_global_batch_loss_and_gradient():
    torch.manual_seed(0)
    text, image = torch.randn(5, 6), torch.randn(5, 6)
    alone = TwoTowers()
    expected = alone(text, image)
    expected.loss.backward()
    results = mp.Manager().dict()
    port = 29500 + int(torch.randint(0, 1000, ()).item())
    mp.spawn(_contrast_on_rank, args=(2, port, text, image, results), nprocs=2)
    for rank in (0, 1):
        loss, grads = results[rank]
        assert math.isclose(loss, expected.loss.item(), rel_tol=1e-6)
        for name, p in alone.named_parameters():  # not 1/2 of it (nor 2x for the scale)
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7)


def test_warm_start_loads_trained_weights_with_a_fresh_optimizer(shards, tmp_path):
    first = configured_tiny(shards, tmp_path)
    _, trained = train(first)
    for source in (RunPaths.of(first).root, RunPaths.of(first).pretrained):
        config = configured_tiny(shards, tmp_path, "name=tuned", f"init_from={source}")
        fresh = FromageModel.from_config(config.model)
        assert not torch.equal(queries(fresh), queries(trained.model))
        warm_start(fresh, config)
        assert torch.allclose(queries(fresh), queries(trained.model), atol=1e-6)

    tuner, _ = train(configured_tiny(shards, tmp_path, "name=tuned", f"init_from={source}"))
    assert tuner.global_step == 2  # its own loop and optimizer, not the first run's

    other = configured_tiny(shards, tmp_path, "name=x", "model.n_visual_tokens=2")
    k = first.model.n_visual_tokens
    with pytest.raises(ValueError, match=rf"another model: \['n_visual_tokens: {k} -> 2'\]"):
        warm_start(FromageModel.from_config(other.model), other | {"init_from": str(source)})


def test_contextual_recall_while_training_equals_make_eval_vist(shards, tmp_path):
    write_stories(tmp_path / "stories", n=6, seed=3, image_size=32)
    config = configured_tiny(
        shards, tmp_path, f"data.stories={tmp_path / 'stories'}", "data.stories_per_validation=6"
    )
    trainer, module = train(config)
    settings = ["1_caption", "5_captions", "5_captions_4_images"]
    for setting in settings:
        assert 0 <= float(trainer.callback_metrics[f"val/ctx_{setting}_R@5"]) <= 100

    callback = contextual_recall_callback(config.data, ks=(1, 5, 10))
    during = callback.contextual_recall(module.model)
    after = vist_main(
        [
            str(RunPaths.of(config).root),
            "--data",
            str(tmp_path / "stories"),
            "--out",
            str(tmp_path / "vist.json"),
            "--no-clip",
            "--image-protocol",  # the callback opens images as training does
            "crop",
        ]
    )
    assert after["n_stories"] == 6 and after["n_bank_images"] == 30
    for setting, recall in during.items():
        assert recall == after["recall"][f"FROMAGe, {setting}"]
    assert [float(trainer.callback_metrics[f"val/ctx_{s}_R@10"]) for s in settings] == [
        pytest.approx(during[s]["R@10"]) for s in during
    ]


def test_without_stories_contexts_come_from_the_validation_shards(shards, tmp_path):
    config = tiny_config(shards, tmp_path, "data.stories=null", "data.stories_per_validation=2")
    callback = contextual_recall_callback(config.data, ks=(1, 5))
    assert callback.records == {}  # read on first use, not when the Trainer is built
    callback.load()
    assert [len(s.captions) for s in callback.stories] == [5, 5]
    assert len(callback.records) == 10  # the bank: the stories' own images
    broken = callback.stories[1].image_ids[2]
    callback.records[broken] = dataclasses.replace(callback.records[broken], data=b"not a jpeg")
    model = tiny_fromage("gpt2")
    recall = callback.contextual_recall(model)
    assert callback.skipped_images == 1
    # one story ranked (the other needs the broken image), its last caption's image among
    # the 9 readable ones, ranked here by hand
    bank = callback.bank(model)
    story = callback.stories[0]
    query = retrieval_queries(model, [[story.captions[-1] + "[RET]"]])[0]  # (D,)
    scores = bank.embeddings @ query  # (9,)
    rank = int((scores > scores[bank.ids.index(story.image_ids[-1])]).sum())
    assert len(bank) == 9
    assert recall["1 caption"] == {"R@1": 100.0 * (rank < 1), "R@5": 100.0 * (rank < 5)}

    unreadable = contextual_recall_callback(config.data, ks=(1,))
    unreadable.load()
    unreadable.records = {
        i: dataclasses.replace(r, data=b"x") for i, r in unreadable.records.items()
    }
    with pytest.raises(ImageLoadError, match="none of the 10 context images"):
        unreadable.contextual_recall(model)


def write_pairs_folder(root):
    """Six good image + caption pairs, an image without a caption, and a broken image."""
    rng = random.Random(0)
    root.mkdir()
    for i in range(6):
        image, caption, _ = make_pair(rng, size=32)
        image.save(root / f"p{i}.jpg")
        (root / f"p{i}.txt").write_text(caption)
    make_pair(rng, size=32)[0].save(root / "no_caption.jpg")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "broken.txt").write_text("a red circle")


def test_finetune_checks_pairs_trains_from_init_and_measures_before_and_after(shards, tmp_path):
    first = configured_tiny(shards, tmp_path)
    train(first)
    write_pairs_folder(tmp_path / "pairs")
    summary = pairs_main([str(tmp_path / "pairs"), "--out", str(tmp_path / "data")])
    assert summary == {"pairs": 8, "train": 5, "val": 1, "skipped": 2}
    skipped = (tmp_path / "data" / "skipped.tsv").read_text()
    assert "no_caption.jpg\tempty caption" in skipped and "broken.jpg\tunreadable" in skipped

    overrides = [*tiny_config_overrides(shards)[2:], f"output_dir={tmp_path}"]
    results = finetune(str(RunPaths.of(first).root), tmp_path / "data", "tuned", overrides)
    assert set(results["before"]) == set(results["after"]) >= {"t2i_R@1", "i2t_R@10"}
    table = (tmp_path / "tuned" / "finetune.md").read_text()
    assert "| before |" in table and "| after |" in table
    assert results["bank"]["images"] == 6 and ImageBank.open(tmp_path / "tuned" / "bank")
    tuned = load_model(tmp_path / "tuned")
    assert not torch.equal(queries(tuned), queries(load_model(RunPaths.of(first).root)))
    # every trainable weight moved, and from INIT's: nearer to them than a fresh model's are
    init, after = (
        trained_weights(RunPaths.of(first).root)[1],
        trained_weights(tmp_path / "tuned")[1],
    )
    fresh = FromageModel.from_config(first.model).trainable_state_dict()
    for name, weight in init.items():
        assert not torch.equal(after[name], weight), name
    moved = sum((after[n] - w).norm() ** 2 for n, w in init.items())
    assert moved < sum((fresh[n] - w).norm() ** 2 for n, w in init.items())


def run_interrupted(mode: str, step: int, overrides: list[str]) -> int:
    from test_reliability import run_interrupted  # it imports this module

    return run_interrupted(mode, step, overrides)


@pytest.fixture(scope="module")
def resampled_setup(shards, tmp_path_factory):
    """The paper's data settings (resampled shards, shuffled, captions paired) on a tiny
    model, trained straight through once."""
    root = tmp_path_factory.mktemp("resampled")
    overrides = configured_tiny_overrides(
        shards,
        root,
        "data.resampled=true",
        "trainer.max_steps=9",
        "trainer.checkpoint_every_n_steps=3",
        "trainer.val_check_interval=3",
        "data.shuffle_buffer=8",
        "loss.concat_captions_prob=0.5",
    )
    assert run_interrupted("none", 0, [*overrides, f"output_dir={root}/straight"]) == 0
    return overrides, load_file(root / "straight/demo/pretrained" / WEIGHTS_FILE)


@pytest.mark.slow  # about 3 min for both: three tiny runs in subprocesses
@pytest.mark.parametrize(
    ("mode", "step", "returncode", "checkpoint_step"),
    [("after_step", 5, -signal.SIGKILL, 3), ("signal", 5, 0, 5)],
)
def test_a_resampled_run_killed_or_preempted_resumes_to_the_same_weights(
    resampled_setup, tmp_path, mode, step, returncode, checkpoint_step
):
    """SIGKILL resumes from the last periodic checkpoint; SLURM's warning signal writes
    one at the next step boundary and stops without exporting. Either way the resumed
    stream goes on with the batches the straight run trained on next."""
    overrides, expected = resampled_setup
    run = [*overrides, f"output_dir={tmp_path}"]
    assert run_interrupted(mode, step, run) == returncode
    last = tmp_path / "demo/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == checkpoint_step
    assert not (tmp_path / "demo/pretrained").exists()  # not finished: nothing exported
    assert run_interrupted("none", 0, run) == 0
    resumed = load_file(tmp_path / "demo/pretrained" / WEIGHTS_FILE)
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("batch", "per_device", "processes", "accumulate", "shares", "steps"),
    [
        (180, None, 1, 1, [180], 1),
        (180, None, 8, 1, [23] * 4 + [22] * 4, 1),  # the paper's batch on 8 GPUs
        (180, None, 16, 1, [12] * 4 + [11] * 12, 1),  # ... on 2 nodes x 8
        (180, 45, 2, 1, [45, 45], 2),  # a device holds 45: two micro-batches of 90
        (180, None, 2, 4, [23, 22], 4),
        (None, 16, 2, 3, [16, 16], 3),  # per device as given: the global batch is 96
    ],
)
def test_the_global_batch_is_shared_by_the_processes(
    batch, per_device, processes, accumulate, shares, steps
):
    plan = plan_batches(batch, per_device, processes, accumulate)
    assert [plan.per_process(rank) for rank in range(processes)] == shares
    assert plan.accumulate == steps
    assert sum(shares) * steps == (batch or 96)
    assert plan.global_batch == (batch or 96)


def test_a_batch_the_processes_cannot_share_is_refused_saying_what_would_work(shards, tmp_path):
    with pytest.raises(BatchSizeError, match=r"would work: data\.batch_size=8 or 7 processes"):
        plan_batches(7, None, 8)
    with pytest.raises(BatchSizeError, match=r"data\.batch_size=180 or data\.batch_size=182"):
        plan_batches(181, 50, 2)
    config = tiny_config(shards, tmp_path, "data.batch_size=3", "trainer.devices=4")
    with pytest.raises(BatchSizeError, match="over 4 processes"):
        train(config)  # before any model is loaded
