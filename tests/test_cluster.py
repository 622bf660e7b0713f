"""The SLURM script and multi-node launches: what Lightning makes of the script's settings
(default suite), torchrun across two "nodes" on localhost (slow), and the script submitted
to a real two-node SLURM on this machine (``make test-cluster``: root, installs Debian's
SLURM)."""

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from data_prep.synthetic import write_split
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import OmegaConf
from safetensors.torch import load_file

from fromage.config import compose
from fromage.model.pretrained import WEIGHTS_FILE
from fromage.train.module import FromageLitModule
from fromage.train.preemption import RequeueOnSignal
from fromage.train.run import build_strategy, build_trainer, train
from test_training import configured_tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "conf" / "cluster" / "slurm.sbatch"
HARNESS = ROOT / "tests" / "cluster" / "slurm.sh"


def sbatch_options(text: str) -> dict[str, str]:
    """``#SBATCH --key=value`` lines -> {key: value}."""
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.MULTILINE))


def training_command(text: str) -> list[str]:
    """The words of the (uncommented) line that runs ``-m fromage.train``, continuations
    joined, with ``${EXP:-paper}`` as submitted without EXP and no extra arguments."""
    code = text.replace("\\\n", " ")
    (line,) = [ln for ln in code.splitlines() if "fromage.train" in ln and not ln.startswith("#")]
    words = shlex.split(line.replace("${EXP:-paper}", "paper"))
    assert words[-1] == "$@"  # sbatch's arguments after the script: overrides
    return words[:-1]


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
    strategy = build_strategy(config.trainer.strategy, config.data.batch_size, 1)
    assert isinstance(strategy, DeepSpeedStrategy)
    # Lightning reads the loader's batch_sampler only without this key (None for WebDataset)
    assert strategy.config["train_micro_batch_size_per_gpu"] == 96
    assert strategy.config["zero_optimization"]["stage"] == 2
    assert strategy.exclude_frozen_parameters


def test_sbatch_script_asks_for_the_signal_training_requeues_on():
    text = SBATCH.read_text()
    assert re.search(r"^#SBATCH --requeue$", text, flags=re.MULTILINE)
    assert re.search(r"^#SBATCH --open-mode=append$", text, flags=re.MULTILINE)  # keep the log
    name, _, lead = sbatch_options(text)["signal"].partition("@")
    assert not name.startswith("B:")  # to the training tasks, not the batch shell only
    assert getattr(signal, name) == RequeueOnSignal(ROOT / "last.ckpt").signum
    assert int(lead) >= 60  # time to save a checkpoint of the paper model


# ---------------------------------------------------------------- torchrun, two "nodes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_weights(run: Path) -> dict[str, torch.Tensor]:
    """The trainable weights (fp32) of the last checkpoint of the demo run under ``run``."""
    checkpoint = torch.load(run / "demo/checkpoints/last.ckpt", weights_only=True)
    return checkpoint["state_dict"]


def initial_weights(config) -> dict[str, torch.Tensor]:
    """The trainable weights ``train(config)`` starts from (same seed, same order)."""
    L.seed_everything(config.seed, workers=True)
    return FromageLitModule(config).state_dict()


# A global batch of 16 = 4 ranks x 4: each rank's one shard is exactly one batch, so every
# step of either run sees all 16 pairs.
RANKS, PER_RANK, STEPS = 4, 4, 3
# Adam with eps far above every gradient is SGD with momentum (lr / eps = 0.01), without
# clipping: the weights then move in proportion to their own gradients, so comparing them
# compares gradients, weight by weight. (Plain Adam's first steps move each weight by about
# +-lr whatever its gradient's size; clipping couples every weight to the total norm.)
LINEAR_ADAM = [
    "optim.warmup_steps=0",
    "optim.eps=100",
    "optim.lr=1",
    "trainer.gradient_clip_val=0",
]
# How far the runs may part, relative to how far the one process moved each weight (a run
# that did not train at all parts by 1.0): fp32 noise of sums taken in another order, since
# both losses are computed over the global batch ([RET], which moves least, parted by
# 2e-4). Before that, the contrastive gradient under DDP was 1/RANKS of one process's and
# the maps into the shared space parted by 0.70-0.78 of their change.
TORCHRUN_RTOL = 1e-3


@pytest.mark.slow
def test_torchrun_on_two_nodes_of_two_processes_trains_like_one_process(tmp_path):
    write_split(tmp_path / "shards/train", n=RANKS * PER_RANK, per_shard=PER_RANK, seed=0)
    write_split(tmp_path / "shards/val", n=RANKS, per_shard=1, seed=1)
    overrides = configured_tiny_overrides(
        tmp_path / "shards",
        tmp_path,
        f"trainer.max_steps={STEPS}",
        f"trainer.checkpoint_every_n_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        "trainer.limit_val_batches=0",
        "data.shuffle_buffer=0",  # the pairs in the order the ranks split them (captions pair up)
        *LINEAR_ADAM,
    )
    port = free_port()
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
             f"--nproc-per-node={RANKS // 2}", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=fromage-test",
             f"--rdzv-conf=is_host={str(node == 0).lower()}", "--local-addr=127.0.0.1",
             "-m", "fromage.train", "demo", *overrides, "trainer=ddp",
             "trainer.accelerator=cpu", f"trainer.devices={RANKS // 2}", "trainer.num_nodes=2",
             f"data.batch_size={RANKS * PER_RANK}", f"output_dir={tmp_path / 'torchrun'}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]  # fmt: skip
    logs = [agent.communicate(timeout=600)[0] for agent in agents]
    for agent, log in zip(agents, logs, strict=True):
        assert agent.returncode == 0, log[-3000:]
    members = re.findall(r"GLOBAL_RANK: (\d), MEMBER: \d/(\d)", "".join(logs))
    assert sorted(members) == [(str(r), str(RANKS)) for r in range(RANKS)]
    checkpoint = torch.load(tmp_path / "torchrun/demo/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == STEPS

    train(compose("demo", [*overrides, f"data.batch_size={RANKS * PER_RANK}",
                           f"output_dir={tmp_path / 'one'}"]))  # fmt: skip
    alone, spread = last_weights(tmp_path / "one"), last_weights(tmp_path / "torchrun")
    initial = initial_weights(compose("demo", overrides))
    assert alone.keys() == spread.keys()
    for name, weights in alone.items():
        moved = (weights - initial[name]).norm()
        assert moved > 0, f"{name} did not train"
        parted = (spread[name] - weights).norm()
        assert parted <= TORCHRUN_RTOL * moved, f"{name}: {parted / moved:.2g} of its change"


# ---------------------------------------------------------------- a real SLURM, two nodes

needs_slurm = pytest.mark.skipif(
    os.environ.get("FROMAGE_TEST_CLUSTER") != "1",
    reason="starts SLURM daemons as root and installs them: make test-cluster",
)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "DEADLINE"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment for SLURM's clients, with nodes n1 and n2 up on this machine;
    every daemon is stopped by its PID afterwards, also when a test failed."""
    directory = tmp_path_factory.mktemp("slurm")
    try:
        subprocess.run([HARNESS, "start", directory], check=True, timeout=300)
        yield {**os.environ, "SLURM_CONF": str(directory / "slurm.conf")}
    finally:
        subprocess.run([HARNESS, "stop", directory], check=True, timeout=120)


def job_state(job: str, env: dict) -> dict[str, str]:
    """``scontrol show job``'s fields, e.g. JobState, Restarts, NodeList."""
    shown = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", shown))


def wait_until(condition, what: str, timeout: float = 600):
    """Poll ``condition()`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@needs_slurm
@pytest.mark.cluster
def test_sbatch_script_on_two_slurm_nodes_is_requeued_when_pre_empted_and_ends_as_uninterrupted(
    slurm, tmp_path
):
    steps, signal_after = 24, 4
    write_split(tmp_path / "shards/train", n=16, per_shard=8, seed=0)  # a shard per rank
    write_split(tmp_path / "shards/val", n=8, per_shard=4, seed=1)
    overrides = configured_tiny_overrides(
        tmp_path / "shards",
        tmp_path,
        "trainer.accelerator=cpu",
        f"trainer.max_steps={steps}",
        f"trainer.checkpoint_every_n_steps={signal_after}",
        f"trainer.val_check_interval={steps}",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=5",
    )
    # Only command-line options and the environment differ from a paper submission:
    # a 2-node x 1-task CPU job, this Python, the demo experiment shrunk by overrides.
    env = slurm | {"PYTHON": sys.executable, "EXP": "demo", "SLURM_LABELIO": "1"}
    jobs, logs, runs = {}, {}, {}
    trainers = {"whole": "ddp", "cut": "ddp", "sharded": "fsdp"}
    for name, trainer in trainers.items():
        logs[name], runs[name] = tmp_path / f"{name}.log", tmp_path / name / "demo"
        submitted = subprocess.run(
            ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
             "--cpus-per-task=1", "--time=00:30:00", f"--output={logs[name]}", str(SBATCH),
             *overrides, f"trainer={trainer}", f"output_dir={tmp_path / name}"],
            cwd=ROOT, env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        jobs[name] = submitted.stdout.strip().split(";")[0]

    def log(name: str) -> str:
        return logs[name].read_text() if logs[name].exists() else ""

    def ended(name: str) -> str | None:
        state = job_state(jobs[name], env)["JobState"]
        if state in ENDED and state != "COMPLETED":
            raise AssertionError(f"job {name} {state}:\n{log(name)[-3000:]}")
        return state == "COMPLETED"

    # pre-empted once it has a checkpoint and most of its steps to go
    first = runs["cut"] / f"checkpoints/step{signal_after}.ckpt"
    wait_until(lambda: first.exists() or ended("cut"), f"{first.name} of the job to pre-empt")
    subprocess.run(["scancel", "--signal=USR1", jobs["cut"]], env=env, check=True)
    wait_until(lambda: job_state(jobs["cut"], env)["Restarts"] == "1", "the requeue", 300)
    requeued_at = time.time()
    assert not (runs["cut"] / "pretrained").exists()  # not exported by the pre-empted run

    wait_until(lambda: all(ended(name) for name in trainers), "the jobs to complete")
    cut = log("cut")
    requeued = f"requeued SLURM job {jobs['cut']}"
    assert "checkpointing after this step" in cut and requeued in cut
    resumed = cut.split(requeued, 1)[1]
    assert "Restoring states from the checkpoint path" in resumed
    for name in trainers:
        # both tasks (srun labels lines with the task id) joined one 2-process group, on
        # nodes n1 and n2
        ranks = re.findall(r"^(\d): .*GLOBAL_RANK: (\d), MEMBER: \d/2", log(name), re.MULTILINE)
        assert set(ranks) == {("0", "0"), ("1", "1")}
        assert job_state(jobs[name], env)["NodeList"] == "n[1-2]"
        checkpoint = torch.load(runs[name] / "checkpoints/last.ckpt", weights_only=True)
        assert checkpoint["global_step"] == steps
    assert len(re.findall(r"^0: .*GLOBAL_RANK: 0", cut, re.MULTILINE)) == 2  # ran twice

    # exported once, by the requeued run, and the same as the uninterrupted job's
    exported = runs["cut"] / "pretrained" / WEIGHTS_FILE
    assert exported.stat().st_mtime > requeued_at
    for key, value in load_file(runs["whole"] / "pretrained" / WEIGHTS_FILE).items():
        torch.testing.assert_close(load_file(exported)[key], value, rtol=0, atol=0)
    whole, cut_weights = last_weights(tmp_path / "whole"), last_weights(tmp_path / "cut")
    assert whole.keys() == cut_weights.keys()
    for key, value in whole.items():
        torch.testing.assert_close(cut_weights[key], value)
    # the sharded job (frozen LM and tower split over the two nodes) trained as DDP did
    assert "each process holds" in log("sharded")
    sharded = load_file(runs["sharded"] / "pretrained" / WEIGHTS_FILE)
    for key, value in load_file(runs["whole"] / "pretrained" / WEIGHTS_FILE).items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-4, atol=1e-5)
