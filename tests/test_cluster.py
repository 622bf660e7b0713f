import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import OmegaConf

from fromage.config import compose
from fromage.train.run import build_strategy, build_trainer

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "conf" / "cluster" / "slurm.sbatch"


def sbatch_options(text: str) -> dict[str, str]:
    """``#SBATCH --key=value`` lines -> {key: value}."""
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.MULTILINE))


def training_command(text: str) -> list[str]:
    """The words of the (uncommented) line that runs ``-m fromage.train``, continuations joined."""
    code = text.replace("\\\n", " ")
    (line,) = [ln for ln in code.splitlines() if "fromage.train" in ln and not ln.startswith("#")]
    return shlex.split(line)


def test_sbatch_script_launches_one_task_per_gpu_with_a_config_lightning_accepts(
    monkeypatch, tmp_path
):
    text = SBATCH.read_text()
    options = sbatch_options(text)
    nodes, tasks, gpus = (int(options[k]) for k in ("nodes", "ntasks-per-node", "gpus-per-node"))
    assert tasks == gpus and nodes > 1
    assert options["job-name"] not in ("bash", "interactive")  # those turn detection off

    words = training_command(text)
    assert words[0] == "srun" and words[2:4] == ["-m", "fromage.train"]
    experiment, overrides = words[4], words[5:]
    slurm = {
        "SLURM_NTASKS": str(nodes * tasks),
        "SLURM_NTASKS_PER_NODE": str(tasks),
        "SLURM_NNODES": str(nodes),
        "SLURM_PROCID": str(tasks + 1),  # the second task of the second node
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NODELIST": "gpu[01-02]",
        "SLURM_JOB_NAME": options["job-name"],
        "SLURM_JOB_ID": "1234",
    }
    overrides = [re.sub(r"\$(\w+)", lambda m: slurm[m[1]], o) for o in overrides]
    config = compose(experiment, overrides)
    assert (config.trainer.devices, config.trainer.num_nodes) == (tasks, nodes)
    assert config.trainer.accelerator == "gpu" and config.trainer.strategy == "ddp"

    # What one srun task sees, on CPU: Lightning's SLURM detection and its own check.
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # the Trainer sets it
    on_cpu = OmegaConf.merge(config, {"trainer": {"accelerator": "cpu"}, "output_dir": tmp_path})
    trainer = build_trainer(on_cpu)
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank) == (
        nodes * tasks,
        tasks + 1,
        1,
    )
    environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)
    with pytest.raises(ValueError, match="ntasks-per-node"):
        environment.validate_settings(num_devices=tasks // 2, num_nodes=nodes)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_sbatch_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_wheelhouse_downloads_pinned_binary_wheels_and_builds_deepspeed_without_ops():
    dry = subprocess.run(
        ["make", "-n", "wheelhouse", "VENV=/nonexistent/venv"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.replace("\\\n", " ")
    (download,) = [line for line in dry.splitlines() if " download " in line]
    for flag in ("--no-deps", "--only-binary=:all:", "--python-version 3.12", "-d .whl"):
        assert flag in download
    assert "-r conf/cluster/wheelhouse.txt" in download
    (deepspeed,) = [line for line in dry.splitlines() if "deepspeed==" in line]
    assert deepspeed.startswith("DS_BUILD_OPS=0 ") and "--no-build-isolation" in deepspeed
    assert "/nonexistent/venv/bin/python -m pip wheel" in deepspeed  # torch importable

    listed = [
        line.split("#")[0].strip()
        for line in (ROOT / "conf" / "cluster" / "wheelhouse.txt").read_text().splitlines()
    ]
    pins = [line for line in listed if line]
    assert all(re.fullmatch(r"[\w.-]+==[\w.]+", pin) for pin in pins)  # one version each
    names = {pin.split("==")[0] for pin in pins}
    assert {"webdataset", "omegaconf", "transformers", "hjson", "pydantic"} <= names


def test_deepspeed_strategy_is_told_the_batch_size_and_skips_frozen_weights():
    pytest.importorskip("deepspeed", reason="DeepSpeedStrategy needs deepspeed installed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    config = compose("paper", ["trainer=deepspeed-zero2", "data.batch_size=96"])
    strategy = build_strategy(config.trainer.strategy, config.data.batch_size)
    assert isinstance(strategy, DeepSpeedStrategy)
    # Lightning reads the loader's batch_sampler only without this key (None for WebDataset)
    assert strategy.config["train_micro_batch_size_per_gpu"] == 96
    assert strategy.config["zero_optimization"]["stage"] == 2
    assert strategy.exclude_frozen_parameters
