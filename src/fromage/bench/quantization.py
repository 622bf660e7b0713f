"""Low-memory LMs (``model.lm.quantize``): what each setting costs and how far it moves the
model's answers from the unquantized LM's.

Each setting loads in a fresh process, because peak memory is a per-process high-water
mark: peak RSS (CPU) or peak allocated CUDA memory while loading, the memory held once
loaded, and the peak while answering. The same seed gives every setting the same
trainable maps (random ones unless ``--trained`` names a run), so the answers differ only
through the LM: top-1 image of ``queries`` text queries against a bank of the first
``bank`` images of the experiment's shards, summed log-likelihoods of candidate answers, and greedy generation
speed with the KV cache. With a trained run, its report's held-out recall@1 too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from fromage.bench.generation import timed_generate
from fromage.config import compose
from fromage.data.datamodule import CaptionDataModule, shard_list
from fromage.data.image_sources import shard_images
from fromage.infer.scoring import log_likelihood, retrieval_queries
from fromage.model.fromage import FromageModel
from fromage.model.load import trained_weights
from fromage.model.tokens import RET_TOKEN
from fromage.train.module import FromageLitModule
from fromage.train.report import evaluate

SETTINGS = {"cpu": ("none", "int8"), "cuda": ("none", "int8", "int4")}
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "pink"]
SHAPES = [
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "diamond",
    "heart",
    "moon",
    "ring",
    "bar",
]
ANSWERS = [f"a {c} {s}." for c in COLOURS[:5] for s in SHAPES[:2]]  # 10 candidates


def run(
    experiment: str = "demo",
    device: str = "cpu",
    queries: int = 100,
    bank: int = 200,
    trained: str | None = None,
    overrides: list[str] = (),
    new_tokens: int = 32,
) -> dict:
    """Measure every setting of ``device`` in its own process; agreement against ``none``.
    ``overrides`` (``key=value``) change the experiment's config."""
    kind = torch.device(device).type
    results = {}
    for setting in SETTINGS[kind]:
        command = [sys.executable, "-m", __name__, setting, "--experiment", experiment]
        command += ["--device", device, "--queries", str(queries), "--bank", str(bank)]
        command += ["--new-tokens", str(new_tokens)]
        command += ["--trained", trained] if trained else []
        command += list(overrides)
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[setting] = json.loads(out.strip().splitlines()[-1])
    base = results["none"]
    for r in results.values():
        r["top1_agreement"] = sum(
            a == b for a, b in zip(r["top1"], base["top1"], strict=True)
        ) / len(base["top1"])
        r["mean_abs_loglik_diff"] = float(
            (torch.tensor(r["loglik"]) - torch.tensor(base["loglik"])).abs().mean()
        )
        r["memory_saved_vs_none"] = 1 - r["loaded_mb"] / base["loaded_mb"]
    for r in results.values():
        del r["loglik"], r["top1"]
    return {
        "experiment": experiment,
        "device": device,
        "queries": queries,
        "bank": bank,
        "trained": trained,
        "settings": results,
    }


def measure(
    experiment: str,
    device: str,
    setting: str,
    queries: int,
    bank: int,
    trained: str | None,
    overrides: list[str] = (),
    new_tokens: int = 32,
) -> dict:
    """One setting, in this (fresh) process."""
    config = compose(experiment, [*overrides, f"model.lm.quantize={setting}"])
    before = _held_mb(device)  # the runtime without a model (torch, CUDA context)
    _reset_peak(device)
    start = time.perf_counter()
    torch.manual_seed(0)  # the same random trainable maps for every setting
    model = FromageModel.from_config(config.model, device)
    if trained:  # its weights only: a second model would count in this process's memory
        model.load_trainable_state_dict(trained_weights(trained)[1], trained)
    model.eval()
    result = {"load_s": time.perf_counter() - start, "load_peak_mb": _peak_mb(device)}
    result["loaded_mb"] = _held_mb(device) - before
    result["process_mb"] = _held_mb(device)
    _reset_peak(device)

    pixels = scene_pixels(model, config, bank)  # (bank, 3, H, W)
    with torch.no_grad():
        images = model.image_embeddings(model.image_features(pixels.to(device)))
    texts = [f"a {COLOURS[i % 10]} {SHAPES[i // 10 % 10]}{RET_TOKEN}" for i in range(queries)]
    text = torch.cat([retrieval_queries(model, [[t]]) for t in texts])
    result["top1"] = (text @ images.T).argmax(1).tolist()
    result["loglik"] = [
        log_likelihood(model, [pixels[i], "Q: what is in the picture? A:"], ANSWERS).tolist()
        for i in range(10)
    ]
    prompt = [pixels[0], "Once upon a time, in a small village by the sea, there lived"]
    timed_generate(model, prompt, True, 2)  # warm-up
    seconds, tokens = min(timed_generate(model, prompt, True, new_tokens) for _ in range(2))
    result["tokens_per_s"] = len(tokens) / seconds
    result["answer_peak_mb"] = _peak_mb(device)
    if trained:
        result["report_metrics"] = _report_metrics(model, config)
    return result


def scene_pixels(model: FromageModel, config, n: int) -> torch.Tensor:
    """The first ``n`` images of the experiment's shards (validation, else training),
    preprocessed: scenes whose features spread as a bank's do. (Random pixels all look
    alike to a trained tower, so which of them ranks first turned on near-ties.)"""
    data = config.data
    shards = shard_list(data.val_shards or data.train_shards, data.how_to_make)
    records = itertools.islice(shard_images(shards), n)
    return torch.stack([model.vision.preprocess(record.open()) for record in records])


def _report_metrics(model: FromageModel, config) -> dict:
    data = CaptionDataModule(config.data, model.tokenizer, model.ret_id, model.vision.preprocess)
    metrics = evaluate(FromageLitModule(config, model), data, [1])["metrics"]
    return {k: metrics[k] for k in ("t2i_R@1", "i2t_R@1")}


def _reset_peak(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # resets VmHWM, the process's peak resident set (Linux)
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mb(device: str) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _proc_status("VmHWM")


def _held_mb(device: str) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    return _proc_status("VmRSS")


def _proc_status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"no {field} in /proc/self/status")


def summary(result: dict) -> list[str]:
    lines = [f"low-memory LMs ({result['experiment']}, {result['device']}):"]
    for setting, r in result["settings"].items():
        line = (
            f"  {setting:>4}: model {r['loaded_mb']:.0f} MB ({r['memory_saved_vs_none']:.0%} less "
            f"than none; process {r['process_mb']:.0f} MB, load peak {r['load_peak_mb']:.0f} MB, answering {r['answer_peak_mb']:.0f}"
            f" MB), load {r['load_s']:.1f} s, {r['tokens_per_s']:.1f} tok/s, top-1 agreement "
            f"{r['top1_agreement']:.0%}, mean |d loglik| {r['mean_abs_loglik_diff']:.3f}"
        )
        if "report_metrics" in r:
            line += f", R@1 t2i {r['report_metrics']['t2i_R@1']:.1f}%"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one setting, in this process (JSON line)")
    parser.add_argument("setting")
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--bank", type=int, default=200)
    parser.add_argument("--trained")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated, for tokens/s")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_intermixed_args(argv)
    result = measure(
        args.experiment,
        args.device,
        args.setting,
        args.queries,
        args.bank,
        args.trained,
        args.overrides,
        args.new_tokens,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
