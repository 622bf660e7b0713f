"""Training-step throughput: this project's step versus a straightforward baseline step.

The baseline is how one would first write the method: captions padded to ``max_len``,
the vision tower run on every step, masks built with Python loops, logits over the whole
vocabulary at every position, and the two objectives in two LM passes. The optimised
step is ``FromageModel.forward`` on precomputed features with dynamic padding (logits
only where there is a target, whole-tensor masking). Both start from the same weights on
the same batch, and their losses are asserted equal before anything is timed.
"""

from __future__ import annotations

import random
import resource
import time

import torch
import torch.nn.functional as F

from fromage.bench.flops import input_size, model_flops_per_sample
from fromage.bench.peak import synchronize
from fromage.data.datamodule import CaptionBatch
from fromage.model.fromage import FromageModel
from fromage.model.objectives import FromageLosses, contrastive_loss
from fromage.model.sequences import IGNORE
from fromage.model.tokens import tokenize_captions
from fromage.train.module import FromageLitModule

WORDS = [
    "a",
    "the",
    "man",
    "woman",
    "dog",
    "cat",
    "red",
    "blue",
    "small",
    "large",
    "old",
    "new",
    "city",
    "street",
    "park",
    "beach",
    "house",
    "car",
    "tree",
    "sky",
    "on",
    "in",
    "with",
    "near",
    "at",
    "of",
    "and",
    "under",
    "over",
    "running",
    "sitting",
    "standing",
]


def cc3m_like_captions(n: int, seed: int = 0) -> list[str]:
    """Captions of CC3M-like length: about 12 tokens on average, and a long tail (1 in 12)
    that ``max_len`` = 24 cuts."""
    rng = random.Random(seed)
    lengths = [
        rng.randint(22, 32) if rng.random() < 1 / 12 else max(3, round(rng.gauss(10.5, 3)))
        for _ in range(n)
    ]
    return [" ".join(rng.choices(WORDS, k=k)) for k in lengths]


def baseline_losses(
    model: FromageModel, pixels: torch.Tensor, captions: list[str], max_len: int
) -> FromageLosses:
    """Both objectives, written the straightforward way (see the module docstring): each
    row's sequences and targets spelled out on the host, then moved to the model's device.

    Captioning reads ``[v_1..v_k] [prefix] [prompt] caption`` and predicts the prefix
    (BOS, as the release trained) and the caption's tokens; retrieval reads ``[prefix]
    caption [RET]`` and predicts the caption and ``[RET]``. The prompt is the model's
    ``input_prompt``, tokenized here on its own.
    """
    ids, mask = tokenize_captions(model.tokenizer, captions, model.ret_id, max_len)
    prompt = model.tokenizer(model.input_prompt, add_special_tokens=False).input_ids
    features = model.image_features(pixels)
    n_prefix, k, pad = len(model.prefix_ids), model.n_visual_tokens, model.tokenizer.pad_token_id
    caption_width = n_prefix + len(prompt) + max_len  # every row padded to the longest possible
    caption_ids, caption_mask, caption_labels = [], [], []
    retrieval_ids, retrieval_mask, retrieval_labels, ret_positions = [], [], [], []
    for row in range(len(captions)):
        tokens = ids[row, : int(mask[row].sum())].tolist()  # prefix, caption, [RET]
        prefix, words, ret = tokens[:n_prefix], tokens[n_prefix:-1], tokens[-1]
        sequence = prefix + prompt + words
        caption_ids.append(sequence + [pad] * (caption_width - len(sequence)))
        caption_mask.append([1] * (k + len(sequence)) + [0] * (caption_width - len(sequence)))
        caption_labels.append(  # visual tokens and prompt are no targets
            [IGNORE] * k + prefix + [IGNORE] * len(prompt) + words
            + [IGNORE] * (caption_width - len(sequence))
        )  # fmt: skip
        retrieval_ids.append(tokens + [pad] * (max_len - len(tokens)))
        retrieval_mask.append([1] * len(tokens) + [0] * (max_len - len(tokens)))
        retrieval_labels.append(
            [IGNORE] * n_prefix + words + [ret] + [IGNORE] * (max_len - len(tokens))
        )
        ret_positions.append(len(tokens) - 1)
    device = pixels.device
    caption_ids, caption_mask, caption_labels, retrieval_ids, retrieval_mask = (
        torch.tensor(t, device=device)
        for t in (caption_ids, caption_mask, caption_labels, retrieval_ids, retrieval_mask)
    )
    retrieval_labels = torch.tensor(retrieval_labels, device=device)
    ret_positions = torch.tensor(ret_positions, device=device)

    def full_vocabulary_ce(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model.token_logits(hidden)
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE,
        )

    visual = model.visual_tokens(features).to(model.lm_dtype)  # (B, k, d_emb)
    caption_embeds = torch.cat([visual, model.embed_ids(caption_ids)], 1)
    caption_hidden = model.run_lm(caption_embeds, caption_mask).last_hidden_state
    output = model.run_lm(
        model.embed_ids(retrieval_ids),
        retrieval_mask,
        all_hidden_states=model.needs_all_hidden_states,
    )
    text = model.retrieval_embeddings(output, ret_positions)
    image = model.image_embeddings(features)
    contrastive = contrastive_loss(text, image, model.logit_scale)
    return FromageLosses(
        caption=full_vocabulary_ce(caption_hidden, caption_labels),
        retrieval_lm=full_vocabulary_ce(output.last_hidden_state, retrieval_labels),
        contrastive=contrastive.loss,
        text_to_image_acc=contrastive.text_to_image_acc,
        image_to_text_acc=contrastive.image_to_text_acc,
        text_embeddings=text,
        image_embeddings=image,
    )


def optimised_losses(
    module: FromageLitModule, features: torch.Tensor, captions: list[str], max_len: int
) -> FromageLosses:
    """The training module's own step on precomputed features."""
    model = module.model
    ids, mask = tokenize_captions(model.tokenizer, captions, model.ret_id, max_len)
    batch = CaptionBatch(
        images=features,
        ids=ids.to(features.device),
        mask=mask.to(features.device),
        keys=[str(i) for i in range(len(captions))],
        lengths=mask.sum(1).tolist(),
        n_skipped=0,
    )
    return module.model_step(batch)


# Relative difference allowed between the baseline's and the optimised step's losses:
# float32 backbones agree to rounding; bf16/fp16 ones round the padded and the packed
# passes' sums differently, by a few of their steps (2^-8 relative for bf16)
LOSS_TOLERANCE = {torch.float32: 1e-4, "reduced": 3e-2}


def check_losses_equal(baseline: FromageLosses, optimised: FromageLosses, dtype) -> None:
    """Raise unless both steps' three losses agree within the backbones' dtype's rounding."""
    tolerance = LOSS_TOLERANCE[torch.float32 if dtype == torch.float32 else "reduced"]
    for name in ("caption", "retrieval_lm", "contrastive"):
        a, b = getattr(baseline, name).item(), getattr(optimised, name).item()
        if abs(a - b) > tolerance * max(1.0, abs(a)):
            raise AssertionError(f"{name} loss differs: baseline {a}, optimised {b}")


def time_steps(step, model: FromageModel, steps: int, rss_before: int, warmup: int = 1) -> dict:
    """Seconds per full step (forward, backward, AdamW) and peak memory: GPU, or the
    process's peak RSS above ``rss_before`` (a high-water mark: a later measurement is
    exact only when its peak is the higher one)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    device = model.image_to_lm.weight.device
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    durations = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step().total().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if i >= warmup:
            durations.append(time.perf_counter() - start)
    result = {"s_per_step": sorted(durations)[len(durations) // 2]}
    if on_gpu:
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    # process-wide high-water mark: a later measurement only sees growth beyond earlier peaks
    result["peak_rss_growth_mb"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    ) / 1024
    return result


def run(
    module: FromageLitModule,
    batch_size: int,
    peak_flops_per_s: float,
    max_len: int = 24,
    steps: int = 3,
) -> dict:
    """Both steps on one batch, on the model's device; MFU against ``peak_flops_per_s``
    (the matmul peak measured in the same run, ``fromage.bench.peak``)."""
    model = module.model
    device = model.image_to_lm.weight.device
    pixels = torch.randn(batch_size, 3, *input_size(model), device=device)
    captions = cc3m_like_captions(batch_size)
    features = model.image_features(pixels)
    torch.manual_seed(0)
    reference = baseline_losses(model, pixels, captions, max_len)
    fast = optimised_losses(module, features, captions, max_len)
    check_losses_equal(reference, fast, model.lm_dtype)
    _, mask = tokenize_captions(model.tokenizer, captions, model.ret_id, max_len)
    mean_tokens = float(mask.sum(1).float().mean())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the optimised step first: the RSS high-water mark only grows
    optimised = time_steps(
        lambda: optimised_losses(module, features, captions, max_len), model, steps, rss_before
    )
    baseline = time_steps(
        lambda: baseline_losses(model, pixels, captions, max_len), model, steps, rss_before
    )
    rates = {
        name: batch_size / t["s_per_step"]
        for name, t in [("baseline", baseline), ("optimised", optimised)]
    }
    flops = {  # per sample: the baseline runs the tower, the optimised step reads features
        "baseline": model_flops_per_sample(model, mean_tokens)["total"],
        "optimised": model_flops_per_sample(model, mean_tokens, precomputed_features=True)["total"],
    }
    return {
        "batch_size": batch_size,
        "mean_caption_tokens": mean_tokens,
        "max_caption_tokens": int(mask.sum(1).max()),
        "losses_equal": True,
        "baseline_samples_per_s": rates["baseline"],
        "optimised_samples_per_s": rates["optimised"],
        "speedup": rates["optimised"] / rates["baseline"],
        "baseline_mfu": rates["baseline"] * flops["baseline"] / peak_flops_per_s,
        "optimised_mfu": rates["optimised"] * flops["optimised"] / peak_flops_per_s,
        "baseline": baseline,
        "optimised": optimised,
    }
