"""``python -m fromage.bench [--only NAME ...] [--device cuda] [--out bench/results.json]
[--quick] [KEY=VALUE ...]``: run, print, save. Everything runs on ``--device`` (default:
CUDA when there is a GPU); MFU is against the matmul peak measured first in the same run.
``KEY=VALUE`` overrides the experiment's config (e.g. other backbones, same settings);
``--quick`` runs every benchmark at a small size, to check that it runs, not to measure."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from fromage.bench import (
    bank_build,
    flops,
    generation,
    loading,
    model_recall,
    peak,
    quantization,
    retrieval,
    training_step,
    web,
)
from fromage.config import CONF_DIR, compose
from fromage.model.fromage import FromageModel
from fromage.train.module import FromageLitModule

BENCHMARKS = (
    "training_step",
    "generation",
    "loading",
    "retrieval",
    "bank_build",
    "flops",
    "quantization",
    "web",
)
# The web benchmark serves the trained demo model to simulated visitors for minutes: it
# runs when asked for (--only web), after `make demo`.
DEFAULT_BENCHMARKS = [name for name in BENCHMARKS if name != "web"]


EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))

# Sizes of each benchmark: what `make bench` measures, and --quick (seconds on a CPU)
FULL = {
    "batch_size": 32,
    "steps": 3,
    "new_tokens": 32,
    "repeats": 2,
    "loader_batches": 8,
    "loader_batch_size": 64,
    "bank_sizes": (10**5, 10**6, 3_300_000),  # CC3M's 3.3M images
    "real_model_copies": 8,
    "bank_images": 1000,
    "queries": 100,
    "quantization_bank": 200,
}
QUICK = {
    "batch_size": 4,
    "steps": 1,
    "new_tokens": 4,
    "repeats": 1,
    "loader_batches": 2,
    "loader_batch_size": 8,
    "bank_sizes": (2000,),
    "real_model_copies": 4,
    "bank_images": 16,
    "queries": 8,
    "quantization_bank": 16,
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=DEFAULT_BENCHMARKS)
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    parser.add_argument(
        "--experiment", default="demo", choices=EXPERIMENTS, help="whose model to benchmark"
    )
    parser.add_argument("--batch-size", type=int, help="training-step batch (default: 32)")
    parser.add_argument("--quick", action="store_true", help="small sizes: does it run?")
    parser.add_argument("--shards", default="data/synthetic/val", help="for the loading benchmark")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--trained", help="quantization: a run whose trained maps to use (default: random ones)"
    )
    parser.add_argument(
        "--bank-sizes",
        type=int,
        nargs="+",
        help="retrieval: bank sizes (default: 10^5 10^6 3.3x10^6; leave out 3300000 to be quick)",
    )
    parser.add_argument(
        "--web-model",
        default="runs/demo/pretrained",
        help="web: model served; retrieval: whose embeddings check the index's recall",
    )
    parser.add_argument("--web-bank", default="runs/demo/bank", help="web: its bank")
    parser.add_argument(
        "--web-requests", type=int, default=300, help="web: requests of the soak run"
    )
    parser.add_argument("--web-sessions", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument(
        "--web-concurrency", type=int, nargs="+", default=[1, 2], help="web: server settings"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_intermixed_args(argv)
    sizes = QUICK if args.quick else FULL
    batch_size = args.batch_size or sizes["batch_size"]

    torch.manual_seed(0)
    needs_model = {"training_step", "generation", "loading", "bank_build"} & set(args.only)
    config = compose(args.experiment, args.overrides)
    model = FromageModel.from_config(config.model, args.device) if needs_model else None
    module = FromageLitModule(config, model) if needs_model else None
    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "device": args.device,
        },
        "experiment": args.experiment,
        "overrides": args.overrides,
        "quick": args.quick,
        "matmul_peak": peak.matmul_peak(args.device),
    }
    if "training_step" in args.only:
        peak_flops = results["matmul_peak"]["flops_per_s"]
        results["training_step"] = training_step.run(
            module, batch_size, peak_flops, config.data.max_len, steps=sizes["steps"]
        )
    if "generation" in args.only:
        results["generation"] = generation.run(model, sizes["new_tokens"], sizes["repeats"])
    if "loading" in args.only:
        results["loading"] = loading.run(
            model, args.shards, sizes["loader_batch_size"], sizes["loader_batches"]
        )
    if "retrieval" in args.only:
        results["retrieval"] = retrieval.run(args.bank_sizes or sizes["bank_sizes"])
        if Path(args.web_model).exists():  # after `make demo`
            results["retrieval"]["real_model"] = model_recall.real_model_recall(
                args.web_model, args.shards, copies=sizes["real_model_copies"]
            )
    if "bank_build" in args.only:
        results["bank_build"] = bank_build.run(model, images=sizes["bank_images"])
    if "flops" in args.only:
        results["flops"] = flops.paper_config_report()
    if "quantization" in args.only:
        results["quantization"] = quantization.run(
            args.experiment,
            args.device,
            queries=sizes["queries"],
            bank=sizes["quantization_bank"],
            trained=args.trained,
            overrides=args.overrides,
            new_tokens=sizes["new_tokens"],
        )
    if "web" in args.only:
        results["web"] = web.run(
            args.web_model,
            args.web_bank,
            args.shards,
            args.web_sessions,
            args.web_concurrency,
            soak_requests=args.web_requests,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results))
    print(f"all figures in {args.out}")
    return results


def summary(results: dict) -> str:
    m = results["matmul_peak"]
    lines = [
        f"machine: {results['machine']}",
        f"matmul peak: {m['flops_per_s'] / 1e12:.2f} TFLOP/s ({m['dtype']}, {m['size']}^3)",
    ]
    if "training_step" in results:
        t = results["training_step"]
        lines.append(
            f"training step (batch {t['batch_size']}, mean {t['mean_caption_tokens']:.1f} caption tokens): "
            f"baseline {t['baseline_samples_per_s']:.1f} samples/s, optimised "
            f"{t['optimised_samples_per_s']:.1f} samples/s -> {t['speedup']:.2f}x (losses equal); "
            f"peak memory growth {_memory(t['baseline'])} vs {_memory(t['optimised'])}; "
            f"MFU {t['baseline_mfu']:.1%} vs {t['optimised_mfu']:.1%}"
        )
    for name, g in results.get("generation", {}).items():
        lines.append(
            f"generation, {name} ({g['prompt_positions']} positions, {g['kv_cache']['tokens']} new tokens): "
            f"KV cache {g['kv_cache']['tokens_per_s']:.1f} tok/s (first token "
            f"{g['kv_cache']['time_to_first_token_s'] * 1000:.0f} ms), no cache "
            f"{g['no_cache']['tokens_per_s']:.1f} tok/s -> {g['speedup']:.2f}x"
        )
    if "loading" in results:
        lines.append(
            f"data loading: {results['loading']['images_per_s_per_worker']:.0f} images/s per worker"
        )
    if "retrieval" in results:
        lines += retrieval.summary(results["retrieval"])
    if "bank_build" in results:
        b = results["bank_build"]
        lines.append(
            f"bank build ({b['images']} {b['image_size']} px JPEGs): folder "
            f"{b['folder_images_per_s']:.0f} images/s, one shard {b['shard_images_per_s']:.0f} "
            f"images/s -> shard takes {b['shard_over_folder']:.2f}x the folder's time"
        )
    if "flops" in results:
        f = results["flops"]
        lines.append(
            f"paper config: {f['gflops_per_sample']:.0f} GFLOP/sample ({f['gflops_per_sample_precomputed_features']:.0f} "
            f"with precomputed features) -> at most {f['h100_bf16_peak_samples_per_s']:.0f} samples/s "
            f"({f['h100_bf16_peak_samples_per_s_precomputed_features']:.0f}) on one H100 at bf16 peak"
        )
    if "quantization" in results:
        lines += quantization.summary(results["quantization"])
    if "web" in results:
        lines += web.summary(results["web"])
    return "\n".join(lines)


def _memory(measurement: dict) -> str:
    if "peak_gpu_memory_gb" in measurement:
        return f"{measurement['peak_gpu_memory_gb']:.2f} GB GPU"
    return f"{measurement['peak_rss_growth_mb']:.0f} MB RSS"


if __name__ == "__main__":
    main()
