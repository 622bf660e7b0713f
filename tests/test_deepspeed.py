"""DeepSpeed's own checkpoint writer and reader, run for real on the CPU (ZeRO-2, gloo).

Lightning's DeepSpeedStrategy needs CUDA, so these tests drive the same DeepSpeed calls
it makes (``save_checkpoint(..., client_state=..., tag="checkpoint",
exclude_frozen_parameters=True)`` and ``load_checkpoint``) around the LightningModule.
"""

import socket

import pytest
import torch
import torch.distributed as dist

from fromage.model.load import load_model
from fromage.model.pretrained import DEEPSPEED_MODEL_STATES, save_pretrained
from fromage.model.tokens import tokenize_captions
from fromage.train.module import FromageLitModule
from test_training import configured_tiny, queries
from tiny import CAPTIONS, random_pixels

deepspeed = pytest.importorskip("deepspeed", reason="make setup installs DeepSpeed (no ops)")

ZERO2 = {
    "train_micro_batch_size_per_gpu": 4,
    "zero_optimization": {"stage": 2},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
}


def free_port() -> str:
    """A port no other process listens on now (tests may run side by side)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


@pytest.fixture(scope="module")
def engine_of():
    """Wraps a LightningModule in a one-process ZeRO-2 engine on the CPU. One process
    group for the module's tests: DeepSpeed keeps its groups, and a second group after
    destroying the first would not be the one it knows."""
    environment = dict(
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=free_port(),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
    )

    def wrap(module, config=ZERO2):
        params = [p for p in module.parameters() if p.requires_grad]
        return deepspeed.initialize(model=module, model_parameters=params, config=config)[0]

    with pytest.MonkeyPatch.context() as patch:
        for key, value in environment.items():
            patch.setenv(key, value)
        yield wrap
    if dist.is_initialized():
        dist.destroy_process_group()


def train_step(engine, module) -> None:
    model = module.model
    ids, mask = tokenize_captions(model.tokenizer, CAPTIONS[:4], model.ret_id, 16)
    loss = model(model.image_features(random_pixels(4)), ids, mask).total()
    engine.backward(loss)
    engine.step()


@pytest.mark.slow  # DeepSpeed compiles its CPU communication op on first use: minutes
def test_zero2_checkpoint_holds_only_trainable_weights_and_exports(
    engine_of,
    shards,
    tmp_path,
):
    config = configured_tiny(shards, tmp_path)
    module = FromageLitModule(config)
    engine = engine_of(module)
    train_step(engine, module)
    checkpoint = tmp_path / "last.ckpt"
    engine.save_checkpoint(
        str(checkpoint),
        client_state={"hyper_parameters": dict(module.hparams), "samples_skipped": 3},
        tag="checkpoint",
        exclude_frozen_parameters=True,
    )
    saved = torch.load(checkpoint / DEEPSPEED_MODEL_STATES, weights_only=True)["module"]
    trainable = {f"model.{k}" for k in module.model.trainable_state_dict()}
    assert set(saved) == trainable  # no frozen weight, not even OPT's tied LM head
    assert sum(v.numel() for v in saved.values()) < 0.2 * sum(
        p.numel() for p in module.parameters()
    )

    exported = load_model(checkpoint)  # the directory, as Lightning names it
    assert torch.equal(queries(exported), queries(module.model))
    save_pretrained(exported, tmp_path / "pretrained")
    assert torch.equal(queries(load_model(tmp_path / "pretrained")), queries(module.model))

    resumed = FromageLitModule(config)
    resumed_engine = engine_of(resumed)
    _, client_state = resumed_engine.load_checkpoint(
        str(checkpoint), tag="checkpoint", load_module_strict=False
    )
    resumed.on_load_checkpoint(client_state)  # what Lightning calls: no state_dict in it
    assert resumed.samples_skipped == 3
    assert torch.equal(queries(resumed.model), queries(module.model))
    train_step(engine, module)
    train_step(resumed_engine, resumed)  # the same continuation: optimizer state restored
    assert torch.allclose(queries(resumed.model), queries(module.model), atol=1e-6)


@pytest.mark.slow  # DeepSpeed compiles its CPU communication op on first use: minutes
def test_zero2_bf16_keeps_ret_on_the_norm_in_its_fp32_master_weights(engine_of, shards, tmp_path):
    """DeepSpeed's bf16 mode, as conf/trainer/deepspeed-zero2.yaml ships it (bf16 working
    weights, fp32 master weights in the ZeRO-2 optimizer), on the CPU."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = FromageLitModule(configured_tiny(shards, tmp_path))
    engine = engine_of(module, {**ZERO2, "bf16": {"enabled": True}})
    ret = module.model.ret_embedding
    assert ret.dtype == torch.bfloat16
    target = module.model.embedding_norm.item()
    for _ in range(2):
        before = safe_get_full_fp32_param(ret).clone()
        train_step(engine, module)
        master = safe_get_full_fp32_param(ret)
        assert not torch.equal(master, before)  # stepped
        module.normalize_ret_embedding()  # what optimizer_step calls after each step
        master = safe_get_full_fp32_param(ret)
        assert master.dtype == torch.float32
        assert master.norm().item() == pytest.approx(target, rel=1e-6)
        assert torch.equal(ret, master.to(torch.bfloat16))  # the working copy follows
