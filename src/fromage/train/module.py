"""FromageLitModule: the training loop of the method (docs/method.md) around FromageModel."""

from __future__ import annotations

import dataclasses
import logging
import random
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from fromage.config import model_differences
from fromage.data.datamodule import CaptionBatch
from fromage.model.fromage import FromageModel
from fromage.model.load import trainable_weights
from fromage.model.objectives import FromageLosses, Gather
from fromage.train.distributed import gather_with_global_grad, global_token_means
from fromage.train.nonfinite import first_nonfinite
from fromage.train.sharding import bytes_held, full_tensor, is_sharded, shard_model

log = logging.getLogger(__name__)


def warmup_step_decay(warmup_steps: int, decay_every_steps: int, decay_factor: float):
    """LR multiplier: linear warm-up, then x ``decay_factor`` every ``decay_every_steps``."""

    def multiplier(step: int) -> float:
        warmup = min(1.0, (step + 1) / max(1, warmup_steps))
        return warmup * decay_factor ** (step // decay_every_steps)

    return multiplier


class FromageLitModule(L.LightningModule):
    """Trains the projections and ``[RET]`` of a FromageModel with both objectives.

    Checkpoints hold only the trainable weights (plus optimizer, scheduler and loop
    state), so a checkpoint of the OPT-6.7B model is megabytes.
    """

    def __init__(self, config: DictConfig, model: FromageModel | None = None):
        super().__init__()
        self.save_hyperparameters({"config": OmegaConf.to_container(config, resolve=True)})
        self.config = config
        self.model = model if model is not None else FromageModel.from_config(config.model)
        self.strict_loading = False  # checkpoints hold only the trainable weights
        self.samples_skipped = 0
        self.samples_skipped_this_epoch = 0
        self.nonfinite_skipped = 0
        self._last_step_time: float | None = None

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (Lightning's ``ModelParallelStrategy``, which gives the
        module its device mesh), shard the model over the processes (``train.sharding``)."""
        if self.device_mesh is not None and not is_sharded(self.model):
            shard_model(self.model, self.device_mesh["data_parallel"])
            held, whole = bytes_held(self.model.lm)
            rank_zero_info(
                f"sharded: each process holds {held / 2**20:.1f} MiB of the LM's "
                f"{whole / 2**20:.1f} MiB ({held / whole:.2f})"
            )

    # ----------------------------------------------------------------- steps
    def model_step(
        self, batch: CaptionBatch, concat_captions: bool = False, gather: Gather | None = None
    ) -> FromageLosses:
        """Both objectives on one batch: the only loss computation, used by training,
        validation, the report and the benchmarks. Without ``gather`` the contrastive
        term ranks this process's batch only (validation: no collective per batch)."""
        return self.model(
            batch.images,
            batch.ids,
            batch.mask,
            concat_captions=concat_captions,
            gather=gather,
            lengths=batch.lengths,
            ret_in_caption=self.config.loss.ret_in_caption,
        )

    def global_batch_losses(self, losses: FromageLosses) -> tuple[FromageLosses, FromageLosses]:
        """``(for_backward, values)`` of a training step's losses on this process's share
        of the global batch. ``values`` are one process's losses over the whole global
        batch (caption losses averaged over every rank's tokens; the contrastive term is
        global already); DDP's mean of the gradients of ``for_backward`` is their gradient."""
        means = torch.stack([losses.caption, losses.retrieval_lm])  # (2,)
        counts = torch.stack([losses.caption_tokens, losses.retrieval_tokens])  # (2,)
        for_backward, values = global_token_means(means, counts)
        return (
            dataclasses.replace(losses, caption=for_backward[0], retrieval_lm=for_backward[1]),
            dataclasses.replace(
                losses,
                caption=values[0],
                retrieval_lm=values[1],
                contrastive=losses.contrastive.detach(),
            ),
        )

    def total(self, losses: FromageLosses) -> torch.Tensor:
        return losses.total(self.config.loss.caption_weight, self.config.loss.retrieval_weight)

    def _log_losses(self, stage: str, losses: FromageLosses, batch_size: int) -> torch.Tensor:
        total = self.total(losses)
        values = {
            "loss": total,
            "caption_ce": losses.caption,
            "retrieval_ce": losses.retrieval_lm,
            "contrastive": losses.contrastive,
            "t2i_acc": losses.text_to_image_acc,
            "i2t_acc": losses.image_to_text_acc,
        }
        self.log_dict(
            {f"{stage}/{k}": v for k, v in values.items()},
            batch_size=batch_size,
            sync_dist=stage == "val",
        )
        self.log(f"{stage}_loss", total, prog_bar=True, batch_size=batch_size, logger=False)
        return total

    def concat_captions_at(self, step: int) -> bool:
        """Whether step ``step`` pairs its captions; drawn from the step number, so a
        resumed run (or a benchmark replaying the steps) makes the same choices."""
        step_rng = random.Random(self.config.seed * 1_000_003 + step)
        return step_rng.random() < self.config.loss.concat_captions_prob

    def training_step(self, batch: CaptionBatch, batch_idx: int) -> torch.Tensor:
        """The losses of the global batch (every rank's share of it), logged as one process
        with the whole batch would log them."""
        losses = self.model_step(
            batch,
            concat_captions=self.concat_captions_at(self.global_step),
            gather=gather_with_global_grad,
        )
        for_backward, losses = self.global_batch_losses(losses)
        self.samples_skipped += batch.n_skipped
        self.samples_skipped_this_epoch += batch.n_skipped
        self.log("train/samples_skipped", float(self.samples_skipped), batch_size=len(batch))
        logit_scale = full_tensor(self.model.logit_scale.detach())[0]
        self.log("train/logit_scale", logit_scale, batch_size=len(batch))
        self._log_throughput(len(batch))
        total = self._log_losses("train", losses, len(batch))
        return self._finite_or_skipped(total, self.total(for_backward), losses, batch)

    def _finite_or_skipped(
        self,
        total: torch.Tensor,
        for_backward: torch.Tensor,
        losses: FromageLosses,
        batch: CaptionBatch,
    ) -> torch.Tensor:
        """A NaN/inf loss never reaches the weights: raise naming the batch and the first
        input, weight or layer that held a NaN/inf (``first_nonfinite``), or (with
        ``loss.on_nonfinite: skip``) count it and return a zero loss whose gradients are
        all zero. ``total`` is the global batch's, the same on every rank, so every rank
        decides alike and they still step in lockstep."""
        if torch.isfinite(total):  # the one device-to-host sync of the step
            return for_backward
        parts = {
            name: float(getattr(losses, name))
            for name in ("caption", "retrieval_lm", "contrastive")
        }
        where = f"step {self.global_step}, batch keys {batch.keys[:8]}"
        source = first_nonfinite(
            self.model,
            {"image features" if batch.has_features else "pixels": batch.images},
            batch.keys,
            rerun=lambda: self.model_step(batch, self.concat_captions_at(self.global_step)),
        )
        cause = source or "this process's share of the batch is finite: another's holds it"
        if self.config.loss.on_nonfinite != "skip":
            raise FloatingPointError(f"non-finite loss {parts} at {where}: {cause}")
        self.nonfinite_skipped += 1
        log.warning("skipping non-finite loss %s at %s: %s", parts, where, cause)
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), batch_size=len(batch))
        return sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)

    def on_train_epoch_start(self) -> None:
        self.samples_skipped_this_epoch = 0

    def on_train_epoch_end(self) -> None:
        self.log("train/samples_skipped_epoch", float(self.samples_skipped_this_epoch))

    def _log_throughput(self, batch_size: int) -> None:
        now = time.perf_counter()
        if self._last_step_time is not None:
            rate = batch_size * self.trainer.world_size / (now - self._last_step_time)
            self.log("samples_per_s", rate, prog_bar=True, batch_size=batch_size)
        self._last_step_time = now

    def optimizer_step(self, *args, **kwargs) -> None:
        """Step, then put ``[RET]`` back on the norm of the frozen embeddings."""
        super().optimizer_step(*args, **kwargs)
        self.normalize_ret_embedding()

    @torch.no_grad()
    def normalize_ret_embedding(self) -> None:
        """Rescale ``[RET]`` to the norm of the frozen embeddings where the optimizer
        steps it: under DeepSpeed ZeRO that is its fp32 master copy (the module holds a
        bf16 working copy, which the next step would overwrite from the master)."""
        ret = self.model.ret_embedding
        if not hasattr(ret, "_hp_mapping"):  # no master copy: the module's is the one
            self.model.normalize_ret_embedding()
            return
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        master = safe_get_full_fp32_param(ret)  # (d_emb,) fp32, gathered from all ranks
        master = master * (self.model.embedding_norm / master.norm())
        safe_set_full_fp32_param(ret, master)  # each rank writes its own partition of it
        ret.copy_(master)

    def validation_step(self, batch: CaptionBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        losses = self.model_step(batch)
        if batch.padding:  # run only so that the other ranks' sharded forward can gather
            return {}
        self._log_losses("val", losses, len(batch))
        return {
            "text_embeddings": losses.text_embeddings,
            "image_embeddings": losses.image_embeddings,
        }

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        optim = self.config.optim
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            parameters,
            lr=optim.lr,
            betas=tuple(optim.betas),
            weight_decay=optim.weight_decay,
            eps=optim.eps,
        )
        schedule = warmup_step_decay(
            optim.warmup_steps, optim.decay_every_steps, optim.decay_factor
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Only the trained weights, whichever strategy writes the checkpoint: DeepSpeed's
        own writer reads this too, and its frozen-parameter filter misses a tied LM head
        (OPT's, the whole embedding matrix)."""
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "") + "model."
        trainable = {prefix + name for name, p in self.model.named_parameters() if p.requires_grad}
        return type(full)((k, v) for k, v in full.items() if k in trainable)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["samples_skipped"] = self.samples_skipped

    def on_load_checkpoint(self, checkpoint: dict, source: str = "checkpoint") -> None:
        """Refuse a checkpoint of another model before Lightning restores anything from it:
        other backbones by config (same shapes do not make the same LM or tower), other
        trainable shapes by state."""
        saved = checkpoint.get("hyper_parameters", {}).get("config", {}).get("model")
        current = OmegaConf.to_container(self.config.model, resolve=True)
        changed = [] if saved is None else model_differences(saved, current)
        if changed:
            raise ValueError(f"{source} was trained with another model config: {changed}")
        if "state_dict" in checkpoint:  # DeepSpeed restores the module's weights itself
            self.model.load_trainable_state_dict(trainable_weights(checkpoint), source)
        self.samples_skipped = checkpoint.get("samples_skipped", 0)
