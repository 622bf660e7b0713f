"""`make gpu-check` at tiny shapes on the CPU: the same code path as on a GPU node."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fromage.bench.gpu_check import MEASUREMENTS, NEEDS, problems
from fromage.bench.gpu_stages import STAGES

REPO = Path(__file__).resolve().parents[1]


def gpu_check(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    command = [sys.executable, "-m", "fromage.bench.gpu_check", "--size", "tiny"]
    command += ["--device", "cpu", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run([*command, *args], cwd=REPO, env=env, capture_output=True, text=True)
    return done.returncode, json.loads(out.read_text())


@pytest.mark.slow  # a dozen processes, each importing torch and Lightning: 1-3 min on 2 cores
def test_tiny_check_runs_every_stage_on_the_cpu(tmp_path):
    code, report = gpu_check(tmp_path)
    stages = report["stages"]
    assert code == 0, report["problems"]
    peak = stages["matmul_peak"]["flops_per_s"]
    for variant in ("pixels", "features"):
        bare, fit = stages[f"bare_step_{variant}"], stages[f"fit_ddp_{variant}"]
        assert fit["fit_over_bare"] == pytest.approx(fit["samples_per_s"] / bare["samples_per_s"])
        for stage in (bare, fit):  # MFU: this stage's FLOPs at its rate, under the peak
            expected = stage["samples_per_s"] * stage["flops_per_sample"] / peak
            assert stage["mfu"] == pytest.approx(expected)
            assert 0 < stage["mfu"] < 1
        assert fit["flops_per_sample"] == bare["flops_per_sample"] and fit["peak_memory_gb"] > 0
        assert stages[f"fit_zero2_{variant}"]["status"] == "skipped"
        assert "CUDA" in stages[f"fit_zero2_{variant}"]["reason"]
    # pixels cost the tower's forward on top of the step on precomputed features
    pixels, features = (
        stages[f"bare_step_{v}"]["flops_per_sample"] for v in ("pixels", "features")
    )
    assert pixels > features
    assert stages["generation"]["tokens_per_s"] > 0
    assert stages["loader"]["images_per_s_per_worker"] > 0
    assert report["machine"]["torch"] and report["size"] == "tiny"
    # the fit/bare gate: the same figures fail a ratio no fit can reach
    assert problems(stages, min_fit_ratio=100.0)


@pytest.mark.slow  # a real stage process: torch and Lightning imports take ~15 s
def test_a_failing_stage_is_reported_and_fails_the_check(tmp_path):
    code, report = gpu_check(tmp_path, "--only", "matmul_peak", "--timeout", "matmul_peak=0.01")
    assert code == 1
    assert report["stages"]["matmul_peak"]["status"] == "failed"
    assert "timed out" in report["stages"]["matmul_peak"]["error"]
    assert report["problems"] and set(report["stages"]) == {"matmul_peak"}


def test_every_stage_is_scheduled_and_skipped_ones_do_not_fail():
    assert set(MEASUREMENTS) | {"stand_ins"} == set(STAGES)
    assert set(NEEDS) == set(MEASUREMENTS)
    stages = {
        "fit_zero2_pixels": {"status": "skipped", "reason": "no GPU"},
        "fit_ddp_pixels": {"status": "ok", "fit_over_bare": 0.95},
    }
    assert problems(stages, min_fit_ratio=0.9) == []
    assert problems(stages, min_fit_ratio=0.96) == [
        "fit_ddp_pixels: fit reaches 95% of the bare step (< 96%)"
    ]
