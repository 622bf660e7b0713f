"""`make gpu-check`: is a GPU node ready to train the paper's model, and how fast?

    python -m fromage.bench.gpu_check [--size paper|tiny] [--device cuda|cpu] [--out PATH]
                                      [--only STAGE ...] [--precision 32-true|bf16-mixed]

Random-weight stand-ins of the paper's shapes (``fromage.bench.shapes``) train on
synthetic 224 px shards written first (pixels, and the tower's precomputed features),
nothing downloaded. Each stage runs in its own process with its own timeout
(``fromage.bench.gpu_stages``); the results are merged into one JSON and a table. The
exit status is non-zero when a stage that ran failed, or when Lightning fit reaches less
than ``--min-fit-ratio`` of the bare step's samples/s. MFU is against the matmul peak
measured by the first stage.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from fromage.bench.gpu_stages import TRAINERS, Context
from fromage.bench.shapes import IMAGE_SIZE, SIZES
from fromage.config import CONF_DIR
from fromage.reporting import markdown_table, write_json

REPO = CONF_DIR.parent  # data_prep/ is importable from here
VARIANTS = ("pixels", "features")
MEASUREMENTS = (
    "matmul_peak",
    *(f"bare_step_{v}" for v in VARIANTS),
    *(f"fit_{t}_{v}" for t in TRAINERS for v in VARIANTS),
    "generation",
    "loader",
)
# preparation, in order, and what each measurement needs of it
PREPARATION = ("shards", "stand_ins", "features")
NEEDS = {
    "matmul_peak": (),
    "generation": ("shards", "stand_ins"),  # the tokenizer's words are the captions'
    "loader": ("shards", "stand_ins"),
    **{m: ("shards", "stand_ins") for m in MEASUREMENTS if m.endswith("_pixels")},
    **{m: PREPARATION for m in MEASUREMENTS if m.endswith("_features")},
}
OUTPUT_TAIL = 3000  # characters of a failed stage's output kept in the JSON


def stage_command(name: str, ctx: Context, result: Path) -> list[str]:
    """The command line of one stage, run from the repository root."""
    size = ctx.size
    if name == "shards":
        return [
            *(sys.executable, "-m", "data_prep.synthetic", "--out", str(ctx.pixel_shards.parent)),
            *("--train", str(size.samples), "--val", "0", "--per-shard", str(size.per_shard)),
            *("--image-size", str(IMAGE_SIZE)),
        ]
    if name == "features":
        return [
            *(sys.executable, "-m", "data_prep.precompute_features", "gpu-check"),
            *ctx.model_overrides(),  # positional, right after the experiment
            *("--shards", str(ctx.pixel_shards), "--out", str(ctx.feature_shards)),
            *("--device", ctx.device),
        ]
    return [
        *(sys.executable, "-m", "fromage.bench.gpu_stages", name, "--workdir", str(ctx.workdir)),
        *("--size", ctx.size_name, "--device", ctx.device, "--precision", ctx.precision),
        *("--out", str(result)),
    ]


def run_stage(command: list[str], timeout_s: float, result: Path) -> dict:
    """Run one stage in a new process group (killed whole on timeout: dataloader
    workers included); ok with its JSON result, or failed with the output's tail."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
        error = None if process.returncode == 0 else f"exit status {process.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        error = f"timed out after {timeout_s:g} s"
    seconds = time.perf_counter() - start
    if error is not None:
        return {
            "status": "failed",
            "error": error,
            "seconds": seconds,
            "output": output[-OUTPUT_TAIL:],
        }
    figures = json.loads(result.read_text()) if result.is_file() else {}
    return {"status": "ok", "seconds": seconds, **figures}


def skip_reason(name: str, device: str) -> str | None:
    """Why a stage cannot run on this machine (ZeRO-2: GPUs and deepspeed only)."""
    if not name.startswith("fit_zero2_"):
        return None
    if not device.startswith("cuda"):
        return "DeepSpeed ZeRO-2 needs a CUDA device"
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install -e '.[deepspeed]')"
    return None


def derive(stages: dict) -> None:
    """Add MFU (against the measured matmul peak) and each fit's ratio to its bare step."""
    peak = stages.get("matmul_peak", {}).get("flops_per_s")
    for name, stage in stages.items():
        if "samples_per_s" not in stage:
            continue
        if peak:
            stage["mfu"] = stage["samples_per_s"] * stage["flops_per_sample"] / peak
        bare = stages.get(f"bare_step_{name.rsplit('_', 1)[1]}", {}).get("samples_per_s")
        if name.startswith("fit_") and bare:
            stage["fit_over_bare"] = stage["samples_per_s"] / bare


def problems(stages: dict, min_fit_ratio: float) -> list[str]:
    """Everything that makes the check fail; empty when it passes."""
    found = [f"{n}: {s['error']}" for n, s in stages.items() if s["status"] == "failed"]
    found += [
        f"{n}: fit reaches {s['fit_over_bare']:.0%} of the bare step (< {min_fit_ratio:.0%})"
        for n, s in stages.items()
        if s.get("fit_over_bare", float("inf")) < min_fit_ratio
    ]
    return found


def table(stages: dict) -> str:
    columns = {
        "status": "status",
        "samples_per_s": "samples/s",
        "mfu": "MFU",
        "fit_over_bare": "fit/bare",
        "peak_memory_gb": "peak GB",
        "tokens_per_s": "tokens/s",
        "images_per_s_per_worker": "images/s/worker",
        "seconds": "wall s",
    }
    rows = {}
    for name, stage in stages.items():
        row = {label: stage[key] for key, label in columns.items() if key in stage}
        if "MFU" in row:
            row["MFU"] = f"{row['MFU']:.2%}"
        row["note"] = (stage.get("reason") or stage.get("error") or "")[:60]
        rows[name] = row
    return markdown_table(rows)


def machine(device: str) -> dict:
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="paper")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    parser.add_argument("--out", type=Path, default=Path("bench/gpu_check.json"))
    parser.add_argument("--workdir", type=Path, default=Path("bench/gpu-check"))
    parser.add_argument("--only", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS))
    parser.add_argument("--min-fit-ratio", type=float, help="default: the size's")
    parser.add_argument(
        "--timeout",
        action="append",
        default=[],
        metavar="STAGE=SECONDS",
        help="another time limit for one stage",
    )
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    timeouts = {**size.timeouts_s, **{k: float(v) for k, v in (t.split("=") for t in args.timeout)}}
    min_fit_ratio = size.min_fit_ratio if args.min_fit_ratio is None else args.min_fit_ratio
    ctx = Context(args.size, args.device, args.precision, args.workdir.resolve())
    (ctx.workdir / "results").mkdir(parents=True, exist_ok=True)

    needed = {p for m in args.only if not skip_reason(m, args.device) for p in NEEDS[m]}
    stages: dict[str, dict] = {}
    for name in [p for p in PREPARATION if p in needed] + list(args.only):
        missing = [p for p in NEEDS.get(name, ()) if stages[p]["status"] != "ok"]
        reason = skip_reason(name, args.device) or (f"{missing[0]} failed" if missing else None)
        if reason:
            stages[name] = {"status": "skipped", "reason": reason}
        else:
            result = ctx.workdir / "results" / f"{name}.json"
            result.unlink(missing_ok=True)
            timeout = timeouts.get(name, size.default_timeout_s)
            stages[name] = run_stage(stage_command(name, ctx, result), timeout, result)
        print(f"{name}: {stages[name]['status']}", flush=True)
    derive(stages)
    failures = problems(stages, min_fit_ratio)
    report = {
        "machine": machine(args.device),
        "size": args.size,
        "precision": args.precision,
        "batch_size": size.batch_size,
        "min_fit_ratio": min_fit_ratio,
        "stages": stages,
        "problems": failures,
    }
    write_json(args.out, report)
    print(table(stages))
    print(f"all figures in {args.out}")
    for problem in failures:
        print(f"FAILED {problem}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
