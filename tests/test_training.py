import dataclasses
import json
import math
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from data_prep.pairs import main as pairs_main
from data_prep.synthetic import make_pair, write_stories

from fromage.config import compose
from fromage.data.image_sources import ImageLoadError
from fromage.eval.vist import main as vist_main
from fromage.infer.bank import ImageBank
from fromage.infer.scoring import retrieval_queries
from fromage.model.fromage import FromageModel
from fromage.model.load import load_model, trained_weights
from fromage.model.objectives import contrastive_loss
from fromage.model.pretrained import read_checkpoint
from fromage.paths import RunPaths
from fromage.train.callbacks import contextual_recall_callback
from fromage.train.distributed import gather_keeping_local_grad
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


def configured_tiny_overrides(shards, tmp_path, *overrides) -> list[str]:
    """The demo experiment's overrides for a model config that names a saved tiny LM and
    a seeded timm tower."""
    model = tiny_model_config(tmp_path / "lm")
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


def _contrast_on_rank(rank, world, port, text, image, results):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    rows = [slice(0, 3), slice(3, 5)][rank]  # uneven local batches: 3 and 2
    local_t = text[rows].clone().requires_grad_()
    local_v = image[rows].clone().requires_grad_()
    out = contrastive_loss(local_t, local_v, torch.tensor(1.0), gather_keeping_local_grad)
    out.loss.backward()
    results[rank] = (out.loss.item(), local_t.grad.abs().sum().item())
    dist.destroy_process_group()


def test_infonce_under_two_gloo_processes_uses_the_global_batch():
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    expected = contrastive_loss(text, image, torch.tensor(1.0)).loss.item()
    results = mp.Manager().dict()
    port = 29500 + int(torch.randint(0, 1000, ()).item())
    mp.spawn(_contrast_on_rank, args=(2, port, text, image, results), nprocs=2)
    for rank in (0, 1):
        loss, grad = results[rank]
        assert math.isclose(loss, expected, rel_tol=1e-5) and grad > 0


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
