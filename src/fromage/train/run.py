"""Train FROMAGe: ``python -m fromage.train EXPERIMENT [group=name] [key=value ...]``.

EXPERIMENT names ``conf/experiment/EXPERIMENT.yaml``; see ``fromage.config``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from fromage.config import check_training_values, compose, model_differences
from fromage.data.datamodule import CaptionDataModule, shard_list
from fromage.model.fromage import FromageModel
from fromage.model.load import trained_weights
from fromage.model.pretrained import read_checkpoint, save_pretrained
from fromage.paths import RunPaths
from fromage.train.batching import BatchPlan, device_processes, plan_batches
from fromage.train.callbacks import RetrievalRecallCallback, contextual_recall_callback
from fromage.train.module import FromageLitModule
from fromage.train.preemption import RequeueOnSignal
from fromage.train.progress import PlainProgress
from fromage.train.sharding import STRATEGY as SHARDED_STRATEGY
from fromage.train.sharding import full_trainable_state, sharded_strategy

# TrainerConfig keys that are this project's, not ``lightning.Trainer`` arguments
# (accumulate_grad_batches: the fewest; the batch plan may accumulate more)
OWN_TRAINER_KEYS = {"strategy", "checkpoint_every_n_steps", "accumulate_grad_batches"}


def batch_plan(config: DictConfig) -> BatchPlan:
    """How the configured global batch is split over the processes the Trainer starts."""
    t = config.trainer
    return plan_batches(
        config.data.batch_size,
        config.data.per_device_batch_size,
        device_processes(t.accelerator, t.devices, t.num_nodes),
        t.accumulate_grad_batches,
    )


def build_strategy(name: str, batch_size: int, processes: int):
    """Strategy names as Lightning takes them, and ``fsdp2`` (``train.sharding``) over
    the ``processes``; DeepSpeed keeps frozen weights out of its checkpoints, and is told
    the per-device ``batch_size`` (for its logging): it cannot read it from a WebDataset
    loader, whose ``batch_sampler`` is None."""
    if name == SHARDED_STRATEGY:
        return sharded_strategy(processes)
    if name.startswith("deepspeed_stage_"):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(
            stage=int(name.rsplit("_", 1)[1]),
            exclude_frozen_parameters=True,
            logging_batch_size_per_gpu=batch_size,
        )
    return name


def plain_progress(enable_progress_bar: bool) -> bool:
    """Whether to print plain progress lines instead of the progress bar: the bar draws
    only on a terminal, so a batch job's log (SLURM, ``make demo > log``) gets lines."""
    return not (enable_progress_bar and sys.stdout.isatty())


def contextual_recall(config: DictConfig) -> L.Callback | None:
    """The contextual recall callback, when the run can compute it: not yet on sharded
    ranks, whose model runs only inside its forward (said once; the paired recall stays)."""
    if config.trainer.strategy != SHARDED_STRATEGY:
        return contextual_recall_callback(config.data, config.recall_ks, config.seed)
    if config.data.stories_per_validation > 0:
        rank_zero_warn(
            "trainer=fsdp: no contextual recall while training (data.stories_per_validation "
            "is ignored); run `make eval-vist EVAL_MODEL=RUN/pretrained` on the trained model"
        )
    return None


def build_trainer(
    config: DictConfig, callbacks: Sequence[L.Callback] = (), plan: BatchPlan | None = None
) -> L.Trainer:
    """A Lightning Trainer: ``config.trainer`` passes through as its arguments, plus the
    run's logger, checkpointing, recall, (off a terminal) plain progress lines and
    ``callbacks``; it accumulates as the batch ``plan`` (by default the config's) says."""
    t = OmegaConf.to_container(config.trainer, resolve=True)
    plan = plan or batch_plan(config)
    paths = RunPaths.of(config)
    plain = plain_progress(t["enable_progress_bar"])
    passthrough = {k: v for k, v in t.items() if k not in OWN_TRAINER_KEYS}
    trainer = L.Trainer(
        **passthrough | {"enable_progress_bar": not plain},
        accumulate_grad_batches=plan.accumulate,
        strategy=build_strategy(t["strategy"], plan.largest_per_process, plan.processes),
        # validate every val_check_interval steps across epochs when it is a step count
        check_val_every_n_epoch=None if isinstance(t["val_check_interval"], int) else 1,
        default_root_dir=paths.root,
        logger=TensorBoardLogger(save_dir=paths.root, name=paths.tensorboard.name),
        callbacks=[
            ModelCheckpoint(
                dirpath=paths.checkpoints,
                filename="step{step}",
                auto_insert_metric_name=False,
                every_n_train_steps=t["checkpoint_every_n_steps"],
                save_top_k=-1,
                save_last=True,
            ),
            LearningRateMonitor(logging_interval="step"),
            RetrievalRecallCallback(config.recall_ks),
            *filter(None, [contextual_recall(config)]),
            RequeueOnSignal(paths.last_checkpoint),
            *([PlainProgress()] if plain else []),
            *callbacks,
        ],
    )
    if trainer.world_size != plan.processes:
        raise RuntimeError(
            f"the Trainer runs {trainer.world_size} processes, the batch plan was made for "
            f"{plan.processes}: set trainer.devices and trainer.num_nodes explicitly"
        )
    return trainer


def train(
    config: DictConfig,
    model: FromageModel | None = None,
    callbacks: Sequence[L.Callback] = (),
) -> tuple[L.Trainer, FromageLitModule]:
    """Fit the experiment, resuming from its last checkpoint when there is one, then
    save the trained model to ``RUN/pretrained`` (for ``fromage.load_model``).

    ``model`` replaces the configured one; it is saved only if it knows its own config.
    ``callbacks`` are added to the Trainer's (e.g. a benchmark's timer). A run stopped by
    the pre-emption signal (``RequeueOnSignal``) returns after its checkpoint, unexported.
    """
    check_training_values(config)  # fail before loading models
    shard_list(config.data.train_shards, config.data.how_to_make)
    plan = batch_plan(config)  # refuses a batch the processes cannot share: before loading
    L.seed_everything(config.seed, workers=True)
    module = FromageLitModule(config, model)
    model = module.model
    trainer = build_trainer(config, callbacks, plan)
    rank_zero_info(plan.describe())
    data = CaptionDataModule(
        config.data,
        model.tokenizer,
        model.ret_id,
        model.vision.preprocess,
        seed=config.seed,
        batch_size=plan.per_process(trainer.global_rank),
        lockstep_validation=config.trainer.strategy == SHARDED_STRATEGY,
    )
    last = RunPaths.of(config).last_checkpoint
    resuming = config.resume and last.exists()
    if resuming:  # a damaged one fails here with what to do, not in Lightning's loader
        read_checkpoint(last, resume_fix(config))
    if config.init_from and not resuming:
        warm_start(model, config)
    trainer.fit(module, datamodule=data, ckpt_path=last if resuming else None)
    if next(c for c in trainer.callbacks if isinstance(c, RequeueOnSignal)).preempted:
        return trainer, module  # to be resumed: not finished, nothing to export
    if trainer.state.finished and trainer.global_step % config.trainer.checkpoint_every_n_steps:
        trainer.save_checkpoint(last)  # the final step, when it fell between checkpoints
    weights = full_trainable_state(model)  # every rank: gathering shards is a collective
    if trainer.is_global_zero and model.config is not None:
        save_pretrained(model, RunPaths.of(config).pretrained, weights=weights)
    return trainer, module


def resume_fix(config: DictConfig) -> str:
    """What to do when the run's last checkpoint cannot be read."""
    paths = RunPaths.of(config)
    return (
        f"to start over delete it (or the run folder {paths.root}); to resume from an "
        f"earlier step copy one of {paths.checkpoints}/step*.ckpt over it"
    )


def warm_start(model: FromageModel, config: DictConfig) -> None:
    """Load the trained weights ``config.init_from`` names into ``model`` (the optimizer
    starts fresh), refusing weights of another model, naming what differs."""
    source_config, state = trained_weights(config.init_from)
    differences = model_differences(source_config, config.model)
    if differences:
        raise ValueError(
            f"init_from={config.init_from} was trained as another model: {differences} "
            "(set model.* to match; the paper's release needs model.lm.extra_tokens=[<|image|>])"
        )
    model.load_trainable_state_dict(state, source=str(config.init_from))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train FROMAGe.")
    parser.add_argument("experiment", help="a file name in conf/experiment/, e.g. paper or demo")
    parser.add_argument("overrides", nargs="*", help="group=name or dotted.key=value")
    args = parser.parse_args(argv)
    config = compose(args.experiment, args.overrides)
    print(OmegaConf.to_yaml(config))
    train(config)


if __name__ == "__main__":
    main()
