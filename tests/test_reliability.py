"""Runs that survive bad numbers and bad inputs, and fail clearly where they must."""

import io

import numpy as np
import pytest
import torch
import webdataset as wds

from fromage.data import FEATURES
from fromage.train import train
from test_training import tiny_config
from tiny import CAPTIONS, tiny_fromage


def write_feature_shards(directory, n: int, dim: int, poisoned: set[int]) -> None:
    """Precomputed-feature shards; samples in ``poisoned`` carry inf features."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for shard in range(2):
        with wds.TarWriter(str(directory / f"{shard:05d}.tar")) as sink:
            for i in range(shard * n // 2, (shard + 1) * n // 2):
                vector = rng.standard_normal(dim).astype(np.float32)
                if i in poisoned:
                    vector[0] = np.inf
                buffer = io.BytesIO()
                np.save(buffer, vector, allow_pickle=False)
                sink.write(
                    {"__key__": f"s{i:04d}", FEATURES: buffer.getvalue(), "txt": CAPTIONS[i]}
                )


@pytest.fixture(scope="module")
def poisoned_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("poisoned")
    write_feature_shards(root / "train", n=16, dim=24, poisoned={5})
    write_feature_shards(root / "val", n=8, dim=24, poisoned=set())
    return root


def test_nonfinite_loss_stops_training_naming_the_batch(poisoned_shards, tmp_path):
    config = tiny_config(poisoned_shards, tmp_path, "data.shuffle_buffer=0", "trainer.max_steps=4")
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* batch keys \[.*'s0005'"):
        train(config, tiny_fromage("opt"))


def test_nonfinite_loss_can_be_skipped_and_counted_without_touching_the_weights(
    poisoned_shards, tmp_path
):
    config = tiny_config(
        poisoned_shards,
        tmp_path,
        "data.shuffle_buffer=0",
        "trainer.max_steps=4",
        "loss.on_nonfinite=skip",
    )
    trainer, module = train(config, tiny_fromage("opt"))
    assert trainer.global_step == 4
    assert module.nonfinite_skipped == 1
    assert float(trainer.callback_metrics["train/nonfinite_skipped"]) == 1.0
    assert all(torch.isfinite(p).all() for p in module.model.parameters() if p.requires_grad)


def test_inputs_longer_than_the_lm_context_are_refused_or_cut(tmp_path):
    model = tiny_fromage("llama")  # 128 positions
    long_text = " ".join(["red"] * 200)
    with pytest.raises(ValueError, match=r"prompt is \d+ positions .* reads at most 128"):
        model.retrieval_queries([[long_text + "[RET]"]])
    with pytest.raises(ValueError, match=r"context \+ answer is .* at most 128"):
        model.log_likelihood(["red " * 30], ["blue " * 40])
    opt = tiny_fromage("opt")  # learned positions: running past 128 would crash
    words = next(n for n in range(1, 128) if len(opt.tokenizer(" red" * n).input_ids) > 115)
    prompt = [" red" * words]
    prompt_length = opt.embed_interleaved([prompt]).embeds.shape[1]
    assert 115 < prompt_length < 128
    out = opt.generate(prompt, max_new_tokens=32, stop_at_newline=False)
    assert len(out.token_ids) <= 128 - prompt_length
