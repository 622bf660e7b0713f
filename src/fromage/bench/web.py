"""The web demo under visitors: several sessions at once, then hours of use, on loopback.

``python -m fromage.bench --only web`` starts ``fromage serve`` on the demo model (a
process of its own, on 127.0.0.1) and drives it with Gradio's own client, one client per
visitor (each its own Gradio session and conversation):

- **load**: 1, 4 and 8 visitors at once, each a two-turn conversation (a held-out image
  with the training prompt, then a description), for each server concurrency measured.
  Per reply: seconds to the first streamed text or image and to the whole reply (p50 /
  p95), replies per minute, and whether every visitor got its own answers: each reply
  must equal the reply the model gives to that conversation alone (greedy decoding is
  deterministic), so a reply built from another visitor's turns shows up.
- **soak**: 300 requests by default (chats with uploads, retrievals, captions) in one
  server process: its resident memory after warm-up and at the end, its open file
  handles, and the files in its thumbnail folder and in Gradio's upload cache.

Every request has a time limit and the whole run a bounded number of requests.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import webdataset as wds
from gradio_client import Client, handle_file

from fromage.data.datamodule import shard_list
from fromage.eval.attributes import names_exactly, shard_attributes, vocabulary_of
from fromage.infer.bank import ImageBank
from fromage.infer.generation import GenerationConfig
from fromage.model.load import load_model
from fromage.web.app import DemoApp

LOOPBACK = "127.0.0.1"
REQUEST_TIMEOUT_S = 300
SETTINGS = GenerationConfig()  # the page's defaults, sent with every chat message


def chat_settings(config: GenerationConfig = SETTINGS) -> list:
    """The chat's slider values, in the page's order."""
    c = config
    return [c.temperature, c.top_p, c.max_new_tokens, c.ret_scale, c.images_per_ret, c.min_score]


@dataclass
class Reply:
    """One answered request: seconds to the first streamed output and to the last."""

    first_s: float | None
    total_s: float
    text: str = ""
    images: list[str] = field(default_factory=list)  # "id · score s" of each shown image


class Visitor:
    """One browser session: its own Gradio client, so its own conversation on the server."""

    def __init__(self, url: str, auth: tuple[str, str] | None = None, settings: list | None = None):
        self.client = Client(
            url, auth=auth, verbose=False, download_files=False, analytics_enabled=False
        )
        self.history: list[dict] = []
        self.settings = settings or chat_settings()

    def chat(self, text: str, files: Sequence[Path] = ()) -> Reply:
        """Send one message and read the streamed reply."""
        message = {"text": text, "files": [handle_file(str(f)) for f in files]}
        start, first = time.perf_counter(), None
        job = self.client.submit(message, self.history, *self.settings, api_name="/chat")
        history, asked = self.history, None
        for history, _status, _box in _outputs(job):
            if asked is None:
                asked = len(history)  # the first update shows the message itself
            elif first is None and len(history) > asked:
                first = time.perf_counter() - start
        total = time.perf_counter() - start
        reply = history[asked or len(history) :]
        self.history = history
        return Reply(first, total, *reply_content(reply))

    def retrieve(self, query: str, k: int = 5) -> Reply:
        start = time.perf_counter()
        gallery, _ = self.client.submit(query, k, api_name="/retrieve").result(REQUEST_TIMEOUT_S)
        total = time.perf_counter() - start
        return Reply(total, total, images=[item["caption"] for item in gallery])

    def caption(self, image: Path, max_new_tokens: int = 16) -> Reply:
        start, first, text = time.perf_counter(), None, ""
        job = self.client.submit(handle_file(str(image)), max_new_tokens, api_name="/caption")
        for text, _status in _outputs(job):
            if first is None and text:
                first = time.perf_counter() - start
        return Reply(first, time.perf_counter() - start, text)

    def close(self) -> None:
        self.client.close()


def _outputs(job):
    """A job's streamed outputs, failing after ``REQUEST_TIMEOUT_S``."""
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    for output in job:
        if time.monotonic() > deadline:
            job.cancel()
            raise TimeoutError(f"no reply within {REQUEST_TIMEOUT_S} s")
        yield output
    job.result(max(1.0, deadline - time.monotonic()))  # raises what the server raised


def reply_content(messages: list[dict]) -> tuple[str, list[str]]:
    """The text and the shown images ("id · score s") of a reply's chat messages, as the
    client receives them or as the app yields them (a string or a file dict)."""
    texts, images = [], []
    for message in messages:
        content = message["content"]
        for part in content if isinstance(content, list) else [content]:
            if isinstance(part, str):
                part = {"type": "text", "text": part}
            elif "path" in part:
                part = {"type": "file", "alt_text": part.get("alt_text")}
            if part.get("type") == "text" and not part["text"].startswith("`"):
                texts.append(part["text"])
            elif part.get("type") == "file":
                images.append(part.get("alt_text") or "")
    return " ".join(texts), images


def reference_replies(app: DemoApp, turns: list[Turn], settings: list | None = None) -> list[Reply]:
    """The replies the app gives to one conversation with nobody else about: the same
    handler the server runs, called in this process."""
    history, dialogue, replies = [], app.new_dialogue(), []
    for turn in turns:
        message = {"text": turn.text, "files": [str(turn.image)] if turn.image else []}
        start = time.perf_counter()
        *_, (shown, _, _, _) = app.chat(message, history, dialogue, *(settings or chat_settings()))
        asked = len(history) + len(message["files"]) + bool(turn.text.strip())
        replies.append(Reply(None, time.perf_counter() - start, *reply_content(shown[asked:])))
        history = shown
    return replies


# ----------------------------------------------------------------------- server process
class Server:
    """``fromage serve`` in a process of its own on a free loopback port."""

    def __init__(self, model: str, bank: str, workdir: Path, concurrency: int, cache_s: int):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.thumbnails = workdir / "thumbnails"
        self.uploads = workdir / "gradio"
        command = [
            *(sys.executable, "-m", "fromage.cli", "serve", model, "--bank", bank),
            *("--host", LOOPBACK, "--port", str(self.port)),
            *("--concurrency", str(concurrency), "--thumbnails", str(self.thumbnails)),
            *("--cache-seconds", str(cache_s)),
        ]
        env = {**os.environ, "GRADIO_TEMP_DIR": str(self.uploads)}
        self.log = open(workdir / f"server-{self.port}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_until_up()

    def _wait_until_up(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited; see {self.log.name}")
            with socket.socket() as s:
                if s.connect_ex((LOOPBACK, self.port)) == 0:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"the server did not start within {timeout_s} s")

    def usage(self) -> dict:
        """Resident memory, open files, and what its folders hold."""
        process = psutil.Process(self.process.pid)
        return {
            "rss_mb": process.memory_info().rss / 2**20,
            "open_files": process.num_fds(),
            "thumbnail_files": _count_files(self.thumbnails),
            "upload_cache_files": _count_files(self.uploads),
            "upload_cache_mb": _folder_bytes(self.uploads) / 2**20,
        }

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


# ----------------------------------------------------------------------- conversations
@dataclass(frozen=True)
class Turn:
    text: str
    image: Path | None = None
    truth: dict | None = None  # the attributes the reply should name (image or description)


def held_out(shards: str, n: int, out: Path) -> list[tuple[Path, dict]]:
    """The first ``n`` held-out images with recorded attributes, written as PNG files."""
    paths = shard_list(shards, "give the held-out shards (data/synthetic/val)")
    truths = shard_attributes(paths)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for sample in wds.DataPipeline(wds.SimpleShardList(paths), wds.tarfile_to_samples()):
        key = sample["__key__"]
        data = next((sample[k] for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
        if key in truths and data is not None:
            path = out / f"{key.replace('/', '_')}.png"
            path.write_bytes(data)
            images.append((path, truths[key]))
        if len(images) == n:
            break
    return images


def conversations(images: list[tuple[Path, dict]], n: int) -> list[list[Turn]]:
    """``n`` two-turn conversations: a held-out image with the training prompt, then a
    description of another image; each conversation's images are its own."""
    result = []
    for i in range(n):
        (a, truth_a), (_, truth_b) = (images[(2 * i + j) % len(images)] for j in range(2))
        description = "a {colour} {shape} at the {place}".format(**truth_b)
        result.append([Turn("A picture of", a, truth_a), Turn(description, None, truth_b)])
    return result


def converse(url: str, turns: list[Turn], settings: list | None = None) -> list[Reply]:
    """One visitor's whole conversation."""
    visitor = Visitor(url, settings=settings)
    try:
        return [visitor.chat(t.text, [t.image] if t.image else []) for t in turns]
    finally:
        visitor.close()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def load_run(url: str, talks: list[list[Turn]], reference: list[list[Reply]]) -> dict:
    """All conversations at once, one visitor each; timings and the cross-talk check."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(talks)) as pool:
        replies = list(pool.map(lambda t: converse(url, t), talks))
    wall = time.perf_counter() - start
    flat = [r for rs in replies for r in rs]
    firsts = [r.first_s for r in flat if r.first_s is not None]
    totals = [r.total_s for r in flat]
    own = [
        got.text == want.text and got.images == want.images
        for rs, refs in zip(replies, reference, strict=True)
        for got, want in zip(rs, refs, strict=True)
    ]
    return {
        "sessions": len(talks),
        "replies": len(flat),
        "first_output_s": {"p50": percentile(firsts, 50), "p95": percentile(firsts, 95)},
        "full_reply_s": {"p50": percentile(totals, 50), "p95": percentile(totals, 95)},
        "replies_per_min": 60 * len(flat) / wall,
        "replies_as_alone": f"{sum(own)}/{len(own)}",
        "no_cross_talk": all(own),
    }


def caption_accuracy(replies: list[list[Reply]], talks: list[list[Turn]], vocabulary) -> str:
    judged = [
        names_exactly(r.text, t.truth, vocabulary)
        for rs, ts in zip(replies, talks, strict=True)
        for r, t in zip(rs, ts, strict=True)
        if t.image is not None
    ]
    return f"{sum(judged)}/{len(judged)}"


def soak(server: Server, images: list[tuple[Path, dict]], requests: int, warmup: int) -> dict:
    """``requests`` requests in turn from a few visitors: chats with an upload, a
    retrieval, a caption; resource use after ``warmup`` requests and at the end."""
    visitors = [Visitor(server.url) for _ in range(3)]
    samples, done, failed = [], 0, 0
    try:
        while done < requests:
            visitor = visitors[done % len(visitors)]
            path, truth = images[done % len(images)]
            kind = done % 3
            try:
                if kind == 0:
                    if len(visitor.history) > 12:  # a visitor starts a new conversation
                        visitor.close()
                        visitor = visitors[done % len(visitors)] = Visitor(server.url)
                    visitor.chat("A picture of", [path])
                elif kind == 1:
                    visitor.retrieve("a {colour} {shape} at the {place}".format(**truth))
                else:
                    visitor.caption(path)
            except Exception:  # counted; the run goes on
                failed += 1
            done += 1
            if done in (warmup, requests) or done % 50 == 0:
                samples.append({"requests": done, **server.usage()})
                print(f"web soak: {samples[-1]}", flush=True)
    finally:
        for visitor in visitors:
            visitor.close()
    after_warmup = next(s for s in samples if s["requests"] == warmup)
    end = samples[-1]
    return {
        "requests": done,
        "failed": failed,
        "samples": samples,
        "rss_growth_after_warmup": end["rss_mb"] / after_warmup["rss_mb"] - 1,
        "open_files_warmup_end": [after_warmup["open_files"], end["open_files"]],
        "max_upload_cache_files": max(s["upload_cache_files"] for s in samples),
        "max_thumbnail_files": max(s["thumbnail_files"] for s in samples),
    }


def run(
    model: str = "runs/demo/pretrained",
    bank: str = "runs/demo/bank",
    shards: str = "data/synthetic/val",
    sessions: Sequence[int] = (1, 4, 8),
    concurrencies: Sequence[int] = (1, 2),
    soak_requests: int = 300,
    cache_s: int = 60,
) -> dict:
    """The load runs for every server concurrency, then the soak at the first one."""
    workdir = Path(tempfile.mkdtemp(prefix="fromage-web-bench-"))
    # the soak cycles through 50 distinct uploads, so Gradio's cache of them must be cleaned
    images = held_out(shards, max(2 * max(sessions), 50), workdir / "images")
    talks = conversations(images, max(sessions))
    alone = DemoApp(load_model(model), ImageBank.open(bank), workdir / "alone")
    reference = [reference_replies(alone, talk) for talk in talks]
    vocabulary = vocabulary_of([truth for _, truth in images])
    result = {"load": {}, "machine_cpus": os.cpu_count()}
    for concurrency in concurrencies:
        server = Server(model, bank, workdir / f"c{concurrency}", concurrency, cache_s)
        try:
            rows = []
            for n in sessions:
                rows.append(load_run(server.url, talks[:n], reference[:n]))
                print(f"web load, concurrency {concurrency}: {rows[-1]}", flush=True)
        finally:
            server.stop()
        result["load"][f"concurrency_{concurrency}"] = rows
    result["caption_accuracy_alone"] = caption_accuracy(reference, talks, vocabulary)
    server = Server(model, bank, workdir / "soak", concurrencies[0], cache_s)
    try:
        result["soak"] = soak(server, images, soak_requests, warmup=30)
        result["soak"]["server_concurrency"] = concurrencies[0]
        result["soak"]["upload_cache_seconds"] = cache_s
    finally:
        server.stop()
    return result


def summary(result: dict) -> list[str]:
    lines = []
    for setting, rows in result["load"].items():
        for r in rows:
            lines.append(
                f"web, {setting}, {r['sessions']} visitors: first output p50/p95 "
                f"{r['first_output_s']['p50']:.2f}/{r['first_output_s']['p95']:.2f} s, full reply "
                f"{r['full_reply_s']['p50']:.2f}/{r['full_reply_s']['p95']:.2f} s, "
                f"{r['replies_per_min']:.0f} replies/min, replies as alone {r['replies_as_alone']}"
            )
    s = result["soak"]
    lines.append(
        f"web soak: {s['requests']} requests ({s['failed']} failed), RSS after warm-up "
        f"{s['rss_growth_after_warmup']:+.1%}, open files {s['open_files_warmup_end']}, at most "
        f"{s['max_upload_cache_files']} files in the upload cache, {s['max_thumbnail_files']} thumbnails"
    )
    return lines
