"""Runs that survive bad numbers and bad inputs, and fail clearly where they must."""

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from data_prep.synthetic import write_split
from PIL import Image
from safetensors.torch import load_file

from fromage.data.datamodule import FEATURES, Example, Skipped, decode_sample
from fromage.data.image_sources import ImageLoadError, fetch_bytes, open_image
from fromage.infer.generation import GenerationConfig, generate
from fromage.infer.scoring import log_likelihood, retrieval_queries
from fromage.model.load import load_model
from fromage.model.pretrained import WEIGHTS_FILE
from fromage.train.run import train
from test_training import configured_tiny_overrides, tiny_config
from tiny import CAPTIONS, IMAGE_SIZE, tiny_clip_tower, tiny_fromage


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


def test_nonfinite_loss_stops_training_naming_the_batch_and_its_bad_sample(
    poisoned_shards, tmp_path
):
    config = tiny_config(poisoned_shards, tmp_path, "data.shuffle_buffer=0", "trainer.max_steps=4")
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* batch keys \[.*'s0005'") as e:
        train(config, tiny_fromage("opt"))
    assert (
        "the first non-finite value is in the batch's image features of samples ['s0005']"
        in str(e.value)
    )


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
    assert float(trainer.callback_metrics["train/samples_skipped_epoch"]) == 0.0  # logged per epoch
    assert all(torch.isfinite(p).all() for p in module.model.parameters() if p.requires_grad)


def test_inputs_longer_than_the_lm_context_are_refused_or_cut(tmp_path):
    model = tiny_fromage("llama")  # 128 positions
    long_text = " ".join(["red"] * 200)
    with pytest.raises(ValueError, match=r"prompt is \d+ positions .* reads at most 128"):
        retrieval_queries(model, [[long_text + "[RET]"]])
    with pytest.raises(ValueError, match=r"context \+ answer is .* at most 128"):
        log_likelihood(model, ["red " * 30], ["blue " * 40])
    opt = tiny_fromage("opt")  # learned positions: running past 128 would crash
    words = next(n for n in range(1, 128) if len(opt.tokenizer(" red" * n).input_ids) > 115)
    prompt = [" red" * words]
    prompt_length = opt.embed_interleaved([prompt]).embeds.shape[1]
    assert 115 < prompt_length < 128
    out = generate(opt, prompt, config=GenerationConfig(max_new_tokens=32, stop_at_newline=False))
    assert len(out.token_ids) <= 128 - prompt_length


def run_interrupted(mode: str, step: int, overrides: list[str]) -> int:
    script = Path(__file__).with_name("interrupted_training.py")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(script.parent), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, str(script), mode, str(step), *overrides],
        env=env,
        capture_output=True,
        timeout=300,
    ).returncode


def trained_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "pretrained" / WEIGHTS_FILE)


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    write_split(root / "shards/train", n=40, per_shard=10, seed=0)
    write_split(root / "shards/val", n=8, per_shard=8, seed=1)
    overrides = configured_tiny_overrides(
        root / "shards",
        root,
        "trainer.max_steps=14",  # 10 batches per epoch: the run crosses into a second epoch
        "trainer.checkpoint_every_n_steps=3",
        "data.shuffle_buffer=8",
        "loss.concat_captions_prob=0.5",
    )
    assert run_interrupted("none", 0, [*overrides, f"output_dir={root}/straight"]) == 0
    return overrides, trained_weights(root / "straight/demo")


def assert_same_weights(resumed: dict, expected: dict) -> None:
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.allclose(resumed[name], value, atol=1e-6), name


@pytest.mark.parametrize(
    ("mode", "step"),
    [("after_step", 5), pytest.param("during_save", 6, marks=pytest.mark.slow)],
)
def test_a_killed_run_resumes_to_the_same_weights(kill_setup, tmp_path, mode, step):
    overrides, expected = kill_setup
    run = [*overrides, f"output_dir={tmp_path}"]
    assert run_interrupted(mode, step, run) == -signal.SIGKILL
    last = tmp_path / "demo/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3  # the write at 6 never landed
    assert run_interrupted("none", 0, run) == 0
    assert_same_weights(trained_weights(tmp_path / "demo"), expected)


@pytest.mark.slow  # about 25 s: two worker processes, killed and resumed
def test_a_killed_run_with_two_loader_workers_resumes_to_the_same_weights(kill_setup, tmp_path):
    """Workers take turns producing batches; each skips its own share of the consumed ones."""
    overrides, _ = kill_setup
    overrides = [*overrides, "data.num_workers=2"]
    assert run_interrupted("none", 0, [*overrides, f"output_dir={tmp_path}/straight"]) == 0
    run = [*overrides, f"output_dir={tmp_path}/killed"]
    assert run_interrupted("after_step", 5, run) == -signal.SIGKILL
    assert run_interrupted("none", 0, run) == 0
    assert_same_weights(
        trained_weights(tmp_path / "killed/demo"), trained_weights(tmp_path / "straight/demo")
    )


class ImageServer(BaseHTTPRequestHandler):
    """Serves a small PNG, an HTML page, a PNG over the size limit, and a slow PNG."""

    def do_GET(self):
        if self.path == "/slow.png":
            time.sleep(2)
        body = (
            b"<html></html>"
            if self.path == "/page.html"
            else PNG * (100 if self.path == "/big.png" else 1)
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if self.path == "/page.html" else "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError):
            self.wfile.write(body)

    def log_message(self, *args):
        pass


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_downloads_check_content_type_size_and_time(server):
    assert fetch_bytes(f"{server}/ok.png", timeout=5, max_bytes=10_000) == PNG
    assert open_image(f"{server}/ok.png").size == (8, 8)
    with pytest.raises(ImageLoadError, match="content type text/html"):
        fetch_bytes(f"{server}/page.html", timeout=5)
    with pytest.raises(ImageLoadError, match="larger than"):
        fetch_bytes(f"{server}/big.png", timeout=5, max_bytes=len(PNG) * 10)
    with pytest.raises(TimeoutError):
        fetch_bytes(f"{server}/slow.png", timeout=0.5)


class RunsCode:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_training_checkpoints_holding_code_are_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="is not a checkpoint of this project") as refused:
        load_model(tmp_path / "evil.ckpt")
    assert not marker.exists()
    assert "weights_only" not in str(refused.value)  # never suggest unpickling it anyway


def noise_image_bytes(kind: str) -> bytes:
    """A 48 px image of random pixels (nothing to compress away), as JPEG or PNG."""
    pixels = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind)
    return buffer.getvalue()


JPEG_BYTES, PNG_BYTES = noise_image_bytes("JPEG"), noise_image_bytes("PNG")
GARBAGE = bytes(np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8))
BROKEN_IMAGES = {
    "jpeg cut in half": JPEG_BYTES[: len(JPEG_BYTES) // 2],
    "jpeg cut after its header": JPEG_BYTES[:200],
    "png cut in half": PNG_BYTES[: len(PNG_BYTES) // 2],
    "png signature then garbage": PNG_BYTES[:8] + GARBAGE,
    "png header chunk then garbage": PNG_BYTES[:33] + GARBAGE,
    "jpeg start-of-image then garbage": JPEG_BYTES[:2] + GARBAGE,
    "gif signature then garbage": b"GIF89a" + GARBAGE,  # a "bomb": DecompressionBombError
    "empty": b"",
}


@pytest.mark.parametrize("name", BROKEN_IMAGES)
@pytest.mark.parametrize("extension", ["jpg", "png"])
def test_broken_image_bytes_are_skipped_with_the_decoders_reason(name, extension):
    """Inputs that get past the format check into the decoder (random bytes almost never
    do): each is skipped, named, and never reaches the model."""
    sample = {"__key__": "k", extension: BROKEN_IMAGES[name], "txt": b"a red circle"}
    outcome = decode_sample(tiny_clip_tower().preprocess, sample)
    assert isinstance(outcome, Skipped), name
    assert outcome.key == "k" and outcome.reason.startswith("undecodable image ("), outcome.reason


def test_the_whole_images_behind_the_broken_ones_decode():
    """The cut images above fail for being cut, not for their content."""
    for payload in (JPEG_BYTES, PNG_BYTES):
        sample = {"__key__": "k", "jpg": payload, "txt": b"a red circle"}
        outcome = decode_sample(tiny_clip_tower().preprocess, sample)
        assert isinstance(outcome, Example) and outcome.image.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
