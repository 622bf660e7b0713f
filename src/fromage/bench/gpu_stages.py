"""One stage of `make gpu-check`, in a process of its own so that a crash, an OOM or a
hang in it (DeepSpeed, say) is reported without taking the other stages down:

    python -m fromage.bench.gpu_stages STAGE --workdir DIR --size tiny --device cpu --out R.json

Every training stage times the same batches the same way (``StepClock``): the clock
starts when the last warm-up step has finished on the device and stops when the last
step has, so samples/s of the bare loop and of Lightning fit compare like for like.
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig

from fromage.bench import generation, loading, peak
from fromage.bench.flops import input_size, model_flops_per_sample
from fromage.bench.shapes import SIZES, Size, write_stand_ins
from fromage.config import compose
from fromage.data.datamodule import CaptionBatch, CaptionDataModule, shard_list
from fromage.model.fromage import FromageModel
from fromage.reporting import write_json
from fromage.train.module import FromageLitModule
from fromage.train.run import train

TRAINERS = {"ddp": "ddp", "zero2": "deepspeed-zero2"}  # stage name part -> conf/trainer file


@dataclass(frozen=True)
class Context:
    """What every stage of one check shares: the size, the device, and where files are."""

    size_name: str
    device: str
    precision: str
    workdir: Path

    @property
    def size(self) -> Size:
        return SIZES[self.size_name]

    @property
    def pixel_shards(self) -> Path:
        return self.workdir / "pixels" / "train"

    @property
    def feature_shards(self) -> Path:
        return self.workdir / "features"

    @property
    def stand_ins(self) -> Path:
        return self.workdir / "stand-ins"

    def model_overrides(self) -> list[str]:
        return [
            f"model.lm.name={self.stand_ins / 'lm'}",
            f"model.vision.name={self.stand_ins / 'clip'}",
        ]

    def config(self, variant: str = "pixels", trainer: str = "ddp", name: str = "") -> DictConfig:
        """``conf/experiment/gpu-check.yaml`` at this size, on these shards and device."""
        size = self.size
        shards = self.pixel_shards if variant == "pixels" else self.feature_shards
        return compose(
            "gpu-check",
            [
                *self.model_overrides(),
                f"trainer={TRAINERS[trainer]}",
                f"trainer.accelerator={'gpu' if self.device.startswith('cuda') else 'cpu'}",
                "trainer.devices=1",
                # DeepSpeed keeps its trainer config's bf16 mode: its "32-true" would cast
                # the frozen LM to fp32 (README, Precision)
                *([f"trainer.precision={self.precision}"] if trainer == "ddp" else []),
                f"trainer.max_steps={size.warmup_steps + size.fit_steps}",
                f"data.train_shards={shards}",
                f"data.batch_size={size.batch_size}",
                f"data.num_workers={size.num_workers}",
                f"output_dir={self.workdir / 'runs'}",
                f"name={name or 'gpu-check'}",
            ],
        )

    def build_model(self, config: DictConfig) -> FromageModel:
        return FromageModel.from_config(config.model, self.device)


class StepClock:
    """Samples/s over the steps after ``warmup``, and the mean caption tokens seen."""

    def __init__(self, warmup: int, device: torch.device):
        if warmup < 1:
            raise ValueError("the clock starts at the end of a warm-up step: warmup >= 1")
        self.warmup, self.device = warmup, device
        self.ends: list[float] = []
        self.samples: list[int] = []
        self.tokens: list[int] = []

    def tick(self, batch: CaptionBatch) -> None:
        """Call when a step is done: waits for the device, then reads the clock."""
        peak.synchronize(self.device)
        self.ends.append(time.perf_counter())
        self.samples.append(len(batch))
        self.tokens.extend(batch.lengths)

    def result(self) -> dict:
        timed = len(self.ends) - self.warmup
        if timed < 1:
            raise RuntimeError(f"{len(self.ends)} steps ran: none after {self.warmup} warm-up")
        seconds = self.ends[-1] - self.ends[self.warmup - 1]
        return {
            "samples_per_s": sum(self.samples[self.warmup :]) / seconds,
            "timed_steps": timed,
            "warmup_steps": self.warmup,
            "mean_caption_tokens": sum(self.tokens) / len(self.tokens),
        }


class FitClock(L.Callback):
    """Ticks a ``StepClock`` at the end of every training batch (after the optimizer)."""

    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.tick(batch)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak CUDA memory allocated since the last reset, or on the CPU the process's RSS
    high-water mark (model included)."""
    if device.type == "cuda":
        return {"peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def training_figures(clock: StepClock, model: FromageModel, variant: str) -> dict:
    """The clock's figures plus the model FLOPs per sample that MFU needs."""
    result = clock.result()
    flops = model_flops_per_sample(
        model, result["mean_caption_tokens"], precomputed_features=variant == "features"
    )
    return {**result, "flops_per_sample": flops["total"]}


# ----------------------------------------------------------------- stages
def stand_ins(ctx: Context) -> dict:
    lm, clip = write_stand_ins(ctx.size, shard_list(str(ctx.pixel_shards)), ctx.stand_ins)
    return {"lm": str(lm), "vision": str(clip)}


def matmul_peak(ctx: Context) -> dict:
    return peak.matmul_peak(ctx.device)


def bare_step(ctx: Context, variant: str) -> dict:
    """``model_step`` -> ``total()`` backward -> AdamW, on batches read up front from
    the very stream fit reads (so it times the step alone, without loading)."""
    config = ctx.config(variant)
    L.seed_everything(config.seed)
    device = torch.device(ctx.device)
    module = FromageLitModule(config, ctx.build_model(config))
    model = module.model.train()
    data = CaptionDataModule(
        config.data, model.tokenizer, model.ret_id, model.vision.preprocess, seed=config.seed
    )
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(ctx.size.warmup_steps + ctx.size.bare_steps)]
    del loader  # its workers are not needed any more
    optimizer = module.configure_optimizers()["optimizer"]
    weights = (config.loss.caption_weight, config.loss.retrieval_weight)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=ctx.precision == "bf16-mixed")
    clock = StepClock(ctx.size.warmup_steps, device)
    reset_peak_memory(device)
    for step, batch in enumerate(batches):
        batch = move_data_to_device(batch, device)
        with autocast:
            losses = module.model_step(batch, concat_captions=module.concat_captions_at(step))
        losses.total(*weights).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.normalize_ret_embedding()
        clock.tick(batch)
    return {**training_figures(clock, model, variant), **peak_memory(device)}


def fit(ctx: Context, variant: str, trainer: str) -> dict:
    """``fromage.train.run.train`` as a user runs it, timed by a callback."""
    config = ctx.config(variant, trainer, name=f"fit_{trainer}_{variant}")
    device = torch.device(ctx.device)
    model = ctx.build_model(config)
    clock = StepClock(ctx.size.warmup_steps, device)
    reset_peak_memory(device)
    train(config, model, callbacks=[FitClock(clock)])
    return {**training_figures(clock, model, variant), **peak_memory(device)}


def generation_speed(ctx: Context) -> dict:
    """Greedy generation with the KV cache after an image and a short text."""
    model = ctx.build_model(ctx.config())
    pixels = torch.randn(3, *input_size(model), generator=torch.Generator().manual_seed(0))
    prompt = [pixels, "a red circle at the"]
    generation.timed_generate(model, prompt, True, 2)  # warm-up
    seconds, tokens = generation.timed_generate(model, prompt, True, ctx.size.new_tokens)
    return {"tokens_per_s": len(tokens) / seconds, "new_tokens": len(tokens)}


def loader_speed(ctx: Context) -> dict:
    """224 px images decoded and preprocessed per second in one worker; the model is
    built on the meta device, as only its tokenizer and image processor are used."""
    model = FromageModel.from_config(ctx.config().model, "meta")
    size = ctx.size
    return loading.run(model, str(ctx.pixel_shards), size.batch_size, size.loader_batches)


STAGES = {
    "stand_ins": stand_ins,
    "matmul_peak": matmul_peak,
    **{f"bare_step_{v}": lambda ctx, v=v: bare_step(ctx, v) for v in ("pixels", "features")},
    **{
        f"fit_{t}_{v}": lambda ctx, t=t, v=v: fit(ctx, v, t)
        for t in TRAINERS
        for v in ("pixels", "features")
    },
    "generation": generation_speed,
    "loader": loader_speed,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--size", choices=list(SIZES), required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--precision", required=True)
    parser.add_argument("--out", type=Path, required=True, help="the stage's JSON result")
    args = parser.parse_args(argv)
    context = Context(args.size, args.device, args.precision, args.workdir)
    write_json(args.out, STAGES[args.stage](context))


if __name__ == "__main__":
    main()
