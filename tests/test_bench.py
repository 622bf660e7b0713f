"""The benchmarks' own logic (their timings are never asserted: that is `make bench`)."""

import pytest
import torch

from fromage.bench import bank_build, generation, training_step
from fromage.bench.flops import Transformer, step_flops_per_sample
from fromage.bench.training_step import baseline_losses, cc3m_like_captions, optimised_losses
from fromage.config import compose
from fromage.model.fromage import FromageModel
from fromage.train.module import FromageLitModule
from tiny import make_tokenizer, random_pixels, tiny_clip_tower, tiny_fromage, tiny_lm


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_baseline_step_computes_the_same_losses_as_the_model(family):
    model = tiny_fromage(family)
    captions = cc3m_like_captions(6)
    pixels = random_pixels(6)
    baseline = baseline_losses(model, pixels, captions, max_len=24)
    module = FromageLitModule(compose("demo"), model)
    fast = optimised_losses(module, model.image_features(pixels), captions, max_len=24)
    for name in ("caption", "retrieval_lm", "contrastive"):
        assert getattr(baseline, name).item() == pytest.approx(getattr(fast, name).item(), rel=1e-5)


def test_cc3m_like_captions_have_cc3m_like_lengths():
    words = torch.tensor([len(c.split()) for c in cc3m_like_captions(2000)], dtype=torch.float)
    assert 10 <= words.mean() <= 12  # + [RET] (and BOS): about 12 tokens
    assert 0.05 < (words >= 22).float().mean() < 0.12  # the tail that max_len cuts


def test_step_flops_follow_the_counting_rule():
    lm = Transformer(layers=2, width=8, ffn=32)  # 2 * (4*64 + 2*8*32) = 1536 weights
    assert lm.weights == 1536
    flops = step_flops_per_sample(lm, vocabulary=10, caption_tokens=5, visual_tokens=1, vision=None)
    caption = 6 * (2 * 1536 + 4 * 2 * 8 * 6)
    retrieval = 5 * (2 * 1536 + 4 * 2 * 8 * 5)
    head = 2 * 8 * 10 * (3 + 4)
    assert flops["total"] == 2 * (caption + retrieval + head)


def test_benchmarks_run_end_to_end_on_a_tiny_model():
    tokenizer = make_tokenizer()
    lm = tiny_lm("llama", len(tokenizer), positions=512)  # room for the dialogue prompt
    model = FromageModel(lm, tokenizer, tiny_clip_tower())
    module = FromageLitModule(compose("demo"), model)
    step = training_step.run(module, batch_size=4, peak_flops_per_s=1e11, steps=1)
    assert step["losses_equal"] and step["speedup"] > 0
    assert step["baseline_mfu"] > 0 and step["optimised_mfu"] > 0
    assert step["baseline"]["peak_rss_growth_mb"] >= step["optimised"]["peak_rss_growth_mb"] >= 0
    generated = generation.run(model, new_tokens=4, repeats=1)
    assert generated["short_prompt"]["kv_cache"]["tokens"] == 4
    assert generated["short_prompt"]["kv_cache_check"]["token_agreement"] == 1.0
    built = bank_build.run(model, images=12, size=32, batch_size=4)
    assert built["images"] == 12 and built["folder_images_per_s"] > 0
    assert built["shard_over_folder"] > 0


def test_kv_cache_check_refuses_float32_tokens_that_disagree():
    model = tiny_fromage("opt")
    prompt = [random_pixels(1)[0], "a red"]
    assert generation.check_kv_cache(model, prompt, [5, 6], [5, 6])["first_step_logit_error"] < 1e-4
    with pytest.raises(AssertionError, match="agree on 50%"):
        generation.check_kv_cache(model, prompt, [5, 6], [5, 7])
