"""``fromage doctor LM``: can this language model (and tower) be grounded as FROMAGe here?

It loads the LM as training would, reads what its tokenizer does, checks what FROMAGe
needs of the LM (input embeddings, the 4-D masks of a packed pass, a KV cache), then
trains a few steps on synthetic pairs in the chosen dtype and saves and reloads the
result: the properties the LM family matrix of the test suite checks for every family it
lists. The answer is one table: each check, what was found, and what to change.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fromage.config import LanguageModelConfig, ModelConfig, VisionConfig, compose
from fromage.data.datamodule import CaptionBatch
from fromage.infer.bank import ImageBank
from fromage.infer.generation import GenerationConfig, generate
from fromage.model.fromage import FromageModel
from fromage.model.load import load_model
from fromage.model.packed_attention import why_packing_is_inexact
from fromage.model.pretrained import save_pretrained
from fromage.model.tokens import tokenize_captions
from fromage.train.module import FromageLitModule
from fromage.train.nonfinite import first_nonfinite

CAPTIONS = [
    "a red circle at the top left of the picture",
    "two blue squares side by side",
    "a small green triangle",
    "a yellow star above a purple cross, both on a white background",
]
# the tower when none is named: random, small; the LM is what is examined
DEFAULT_TOWER = VisionConfig(name="test_vit", backend="timm", pretrained=False, image_size=64)
LOSSES = ("caption", "retrieval_lm", "contrastive")


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool | None  # None: not run, because an earlier check failed
    found: str
    change: str = ""


def language_model_config(spec: str) -> LanguageModelConfig:
    """A hub id, a local folder, ``wheel:DIST``, or the path of a ``.gguf`` file."""
    if spec.endswith(".gguf"):
        path = Path(spec)
        return LanguageModelConfig(name=str(path.parent), gguf_file=path.name)
    return LanguageModelConfig(name=spec)


def synthetic_batch(model: FromageModel, seed: int = 0) -> CaptionBatch:
    """The captions above with noise pictures, preprocessed by the tower's own recipe."""
    rng = np.random.default_rng(seed)
    pictures = [
        Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8))
        for i in range(len(CAPTIONS))
    ]
    pixels = torch.stack([model.vision.preprocess(picture) for picture in pictures])
    ids, mask = tokenize_captions(model.tokenizer, CAPTIONS, model.ret_id, 32)
    return CaptionBatch(pixels, ids, mask, list(CAPTIONS), mask.sum(1).tolist(), 0)


def losses_of(model: FromageModel, batch: CaptionBatch, concat: bool = False):
    return model(batch.images, batch.ids, batch.mask, concat_captions=concat, lengths=batch.lengths)


def diagnose(config: ModelConfig, steps: int = 3) -> list[Check]:
    """Every check, in order; those that need a finite loss are not run without one."""
    try:
        model = FromageModel.from_config(config)
    except Exception as error:  # what the user must see is the LM's own refusal
        return [Check("builds as FROMAGe", False, f"{type(error).__name__}: {error}")]
    checks = [loaded(model, config), tokenizer_behaviour(model), reads_input_embeddings(model)]
    batch = synthetic_batch(model)
    finite = finite_losses(model, batch)
    checks.append(finite)
    later = [  # (name, check, what to change where it raises)
        ("packed pass = padded passes", packed_equals_padded, "model.pack_sequences=false"),
        (f"{steps} training steps", lambda m, b: training_steps(m, b, steps), ""),
        ("KV cache = re-running the prefix", lambda m, b: kv_cache(m), "use_cache=False"),
        ("save -> load_model", save_and_load, ""),
    ]
    for name, check, change in later:
        if not finite.passed:
            checks.append(Check(name, None, "not run"))
            continue
        try:
            checks.append(check(model, batch))
        except Exception as error:  # e.g. an LM that refuses 4-D masks or a cache
            checks.append(Check(name, False, f"{type(error).__name__}: {error}", change))
    return checks


def loaded(model: FromageModel, config: ModelConfig) -> Check:
    lm = model.lm
    text = lm.config.get_text_config()
    window = getattr(text, "sliding_window", None)
    head = "tied" if model.tied_output else "untied"
    found = (
        f"{type(lm).__name__} ({text.model_type}), {lm.num_parameters() / 1e6:.1f} M parameters "
        f"in {config.dtype}, {model.max_positions} positions"
        + (f", sliding window {window}" if window else "")
        + f", {head} output embeddings; tower {type(model.vision).__name__} (d_vis {model.vision.dim})"
    )
    return Check("loads", True, found)


def tokenizer_behaviour(model: FromageModel) -> Check:
    tokenizer = model.tokenizer
    bos = tokenizer.bos_token is not None and tokenizer("a").input_ids[0] == tokenizer.bos_token_id
    own_pad = tokenizer.init_kwargs.get("pad_token")  # as loaded: FromageModel pads with EOS
    found = (
        f"{'puts' if bos else 'no'} BOS first, EOS {tokenizer.eos_token!r}, "
        + (f"pad {str(own_pad)!r}" if own_pad else "no pad token (FROMAGe pads with EOS)")
        + f", pads {tokenizer.padding_side}; FROMAGe pads captions right, ending in [RET]"
    )
    if tokenizer.eos_token is None:
        return Check("tokenizer", False, found, "give the tokenizer an EOS token")
    return Check("tokenizer", True, found)


@torch.no_grad()
def reads_input_embeddings(model: FromageModel) -> Check:
    """Visual tokens enter the LM as input embeddings: ``inputs_embeds`` must give what
    the token ids give."""
    ids = model.tokenizer(CAPTIONS[:1], return_tensors="pt").input_ids
    try:
        by_ids = model.lm.base_model(input_ids=ids).last_hidden_state
        by_embeds = model.run_lm(model.embed_ids(ids)).last_hidden_state
    except Exception as error:
        return Check(
            "reads inputs_embeds",
            False,
            f"{type(error).__name__}: {error}",
            "this LM cannot read images as FROMAGe feeds them",
        )
    if not torch.equal(by_ids, by_embeds):
        gap = (by_ids.float() - by_embeds.float()).abs().max().item()
        return Check(
            "reads inputs_embeds",
            False,
            f"differs from input_ids by {gap:.3g}",
            "this LM embeds its ids differently (a scaled embedding?); FROMAGe needs inputs_embeds to match",
        )
    return Check("reads inputs_embeds", True, "same hidden states as from input_ids")


@torch.no_grad()
def finite_losses(model: FromageModel, batch: CaptionBatch) -> Check:
    losses = losses_of(model, batch)
    values = {name: float(getattr(losses, name)) for name in LOSSES}
    found = ", ".join(f"{name} {value:.3f}" for name, value in values.items())
    if all(np.isfinite(list(values.values()))):
        return Check("finite losses", True, found)
    return nonfinite("finite losses", found, model, batch, lambda: losses_of(model, batch))


def nonfinite(name: str, found: str, model: FromageModel, batch: CaptionBatch, rerun) -> Check:
    """A failed check naming the first NaN/inf that ``rerun`` makes, and what to change."""
    source = first_nonfinite(model, {"pixels": batch.images}, batch.keys, rerun)
    if source is None:
        return Check(name, False, f"{found}: no source found", "lower optim.lr")
    return Check(name, False, f"{found}: {source.where}", source.advice)


@torch.no_grad()
def packed_equals_padded(model: FromageModel, batch: CaptionBatch) -> Check:
    name = "packed pass = padded passes"
    why = why_packing_is_inexact(model.lm.config)
    if why:
        return Check(name, True, f"packing steps aside: {why}; two padded passes are used")
    tolerance = 1e-4 if model.lm_dtype == torch.float32 else 2e-2  # 16-bit: rounding differs
    packed = losses_of(model, batch, concat=True)
    model.pack_sequences = False
    try:
        padded = losses_of(model, batch, concat=True)
    finally:
        model.pack_sequences = True  # as it was: packing does not step aside for this LM
    gaps = {n: abs(float(getattr(packed, n)) / float(getattr(padded, n)) - 1) for n in LOSSES}
    found = f"largest relative gap {max(gaps.values()):.2g} (tolerance {tolerance:g})"
    if max(gaps.values()) > tolerance:
        return Check(name, False, found, "model.pack_sequences=false")
    return Check(name, True, found)


def training_steps(model: FromageModel, batch: CaptionBatch, steps: int) -> Check:
    """The project's optimizer for ``steps`` steps: only the trainable parts move."""
    name = f"{steps} training steps"
    module = FromageLitModule(compose("demo"), model)
    optimizer = module.configure_optimizers()["optimizer"]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    totals = []
    for step in range(steps):
        losses = module.model_step(batch, concat_captions=step % 2 == 1)
        total = module.total(losses)
        if not torch.isfinite(total):
            found = f"loss not finite at step {step}"
            return nonfinite(name, found, model, batch, lambda: module.model_step(batch))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        module.normalize_ret_embedding()
        totals.append(total.item())
    moved_frozen = [
        n
        for n, p in model.named_parameters()
        if not p.requires_grad and not torch.equal(p, frozen[n])
    ]
    still = [
        n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])
    ]
    found = "losses " + " -> ".join(f"{t:.3f}" for t in totals)
    if moved_frozen:
        return Check(
            name,
            False,
            f"{found}; frozen weights changed: {moved_frozen[:3]}",
            "report this LM: a frozen weight must not move",
        )
    if still:
        return Check(
            name,
            False,
            f"{found}; trainable parts that did not move: {still[:3]}",
            "gradients do not reach them through this LM",
        )
    return Check(name, True, f"{found}; every frozen weight unchanged")


@torch.no_grad()
def kv_cache(model: FromageModel) -> Check:
    features = torch.randn(8, model.vision.dim, generator=torch.Generator().manual_seed(1))
    bank = ImageBank(model.image_embeddings(features), [f"image{i}" for i in range(8)])
    config = GenerationConfig(max_new_tokens=12, stop_at_newline=False)
    prompt = [CAPTIONS[0]]
    cached = generate(model, prompt, bank, config).token_ids
    rerun = generate(model, prompt, bank, replace(config, use_cache=False)).token_ids
    agree = next(
        (i for i, (a, b) in enumerate(zip(cached, rerun, strict=False)) if a != b),
        min(len(cached), len(rerun)),
    )
    found = f"{agree} of {len(rerun)} generated tokens agree"
    if cached == rerun:
        return Check("KV cache = re-running the prefix", True, found)
    if model.lm_dtype != torch.float32:  # cached and full passes round differently
        return Check(
            "KV cache = re-running the prefix", True, f"{found} ({model.lm_dtype} rounding)"
        )
    return Check(
        "KV cache = re-running the prefix",
        False,
        found,
        "generate with use_cache=False (GenerationConfig)",
    )


@torch.no_grad()
def save_and_load(model: FromageModel, batch: CaptionBatch) -> Check:
    with tempfile.TemporaryDirectory() as directory:
        save_pretrained(model, directory, dtype="float32")  # the trained weights, unrounded
        loaded_model = load_model(directory)
    same_images = torch.equal(
        model.image_embeddings(model.image_features(batch.images)),
        loaded_model.image_embeddings(loaded_model.image_features(batch.images)),
    )
    same_losses = all(
        float(getattr(a, n)) == float(getattr(b, n))
        for a, b in [(losses_of(model, batch), losses_of(loaded_model, batch))]
        for n in LOSSES
    )
    if same_images and same_losses:
        return Check("save -> load_model", True, "identical image embeddings and losses")
    return Check(
        "save -> load_model",
        False,
        f"image embeddings equal: {same_images}, losses equal: {same_losses}",
        "report this LM: it does not load back as it was saved",
    )


def table(checks: list[Check]) -> str:
    """The checks as a Markdown table."""
    mark = {True: "pass", False: "FAIL", None: "not run"}
    rows = ["| check | result | found | what to change |", "| --- | --- | --- | --- |"]
    rows += [f"| {c.name} | {mark[c.passed]} | {c.found} | {c.change} |" for c in checks]
    return "\n".join(rows)
