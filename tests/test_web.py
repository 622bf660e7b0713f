"""The web demo in a real browser: Debian's Chromium driven by Playwright."""

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from fromage.cli import main as cli_main
from fromage.infer.bank import ImageBank
from fromage.infer.generation import GenerationConfig
from fromage.model.load import load_model
from fromage.web.app import DemoApp, launch
from fromage.web.uploads import UploadError, read_upload
from test_cli import make_chatty
from tiny import tiny_fromage

CHROMIUM = Path("/usr/bin/chromium")
# quiet, offline Chromium: no background connections this machine would refuse
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT_DIR = os.environ.get("FROMAGE_SCREENSHOT_DIR")  # set to refresh the README's picture


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The always-[RET] tiny model and its six-image bank, served on a free local port."""
    root = tmp_path_factory.mktemp("web")
    ranking = make_chatty(root)
    defaults = GenerationConfig(max_new_tokens=4, min_words=1)
    model, bank = load_model(root / "model"), ImageBank.open(root / "bank")
    app = DemoApp(model, bank, root / "t", defaults, layout="qa")
    port = free_port()
    page = launch(app, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}", root, ranking
    page.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium (make browser installs it)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def send(page, text: str, files: list[Path] = ()) -> None:
    if files:
        page.locator("#message input[type=file]").set_input_files([str(f) for f in files])
    page.locator("#message textarea").fill(text)
    page.locator("#message textarea").press("Enter")


def test_chat_streams_text_and_inline_retrieved_images_per_session(served, browser, tmp_path):
    url, root, ranking = served
    first = browser.new_context(viewport={"width": 1100, "height": 900})
    page = first.new_page()
    page.goto(url)
    page.wait_for_selector("#message textarea", timeout=60_000)

    send(page, "what is this?", [root / "images" / ranking[0]])
    bot = page.locator("#chat [data-testid='bot']")
    expect(bot.locator("img").first).to_be_visible(timeout=60_000)
    expect(page.locator("#status")).to_have_text("Done.", timeout=60_000)
    reply = bot.all_inner_texts()
    assert reply[0].startswith("a")  # the text the model says before [RET] is allowed
    # the uploaded image is in the bank: it is never retrieved; the next best ones are
    assert f"{ranking[1]} · score" in " ".join(reply)
    assert ranking[0] not in " ".join(reply)
    assert bot.locator("img").count() == 3  # max 4 new tokens: "a" then three [RET]s
    if SCREENSHOT_DIR:
        page.screenshot(path=str(Path(SCREENSHOT_DIR) / "web_demo.png"))
    page.screenshot(path=str(tmp_path / "web_demo.png"))
    assert (tmp_path / "web_demo.png").stat().st_size > 10_000

    # a text file is refused with a message; the conversation and the server go on
    (tmp_path / "notes.txt").write_text("not an image")
    send(page, "and this?", [tmp_path / "notes.txt"])
    expect(page.locator("#status")).to_contain_text("notes.txt is not an image", timeout=30_000)
    send(page, "")
    expect(page.locator("#status")).to_contain_text("Type a message", timeout=30_000)

    # another browser session starts with an empty conversation
    second = browser.new_context().new_page()
    second.goto(url)
    second.wait_for_selector("#message textarea", timeout=60_000)
    assert second.locator("#chat [data-testid='bot']").count() == 0
    assert second.locator("#chat [data-testid='user']").count() == 0
    assert page.locator("#chat [data-testid='user']").count() == 2  # image + text

    page.locator("#clear").click()
    expect(page.locator("#chat [data-testid='user']")).to_have_count(0, timeout=30_000)
    first.close()


def test_uploads_are_checked_before_the_model_sees_them(tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "ok.png")
    upload = read_upload(tmp_path / "ok.png")
    assert upload.image.size == (40, 30)
    assert upload.sha256 == hashlib.sha256((tmp_path / "ok.png").read_bytes()).hexdigest()
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(UploadError, match="not an image"):
        read_upload(tmp_path / "text.png")
    with pytest.raises(UploadError, match="MB; images up to"):
        read_upload(tmp_path / "ok.png", max_bytes=10)
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")  # tiny file, 81 M pixels
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    with pytest.raises(UploadError, match="decompression bomb"):
        read_upload(tmp_path / "bomb.png", max_pixels=10_000_000)


def last(replies):
    return list(replies)[-1]


def test_retrieval_and_caption_tabs_answer_and_refuse_bad_input(served, tmp_path):
    _, root, ranking = served
    model, bank = load_model(root / "model"), ImageBank.open(root / "bank")
    app = DemoApp(model, bank, tmp_path / "t", GenerationConfig(min_words=1))
    gallery, status = app.retrieve("a red square", 3)
    assert len(gallery) == 3 and status == "Top 3."
    assert all(Path(path).is_file() and " · score " in caption for path, caption in gallery)
    assert app.retrieve("   ", 3) == ([], "Type a description of the image to find.")
    # the forced model says "a", then [RET] as soon as it may: the caption ends there
    assert last(app.caption(str(root / "images" / ranking[0]), 3)) == ("a", "Done.")
    # without a bank [RET] cannot come: it says "a" up to the length limit
    no_bank = DemoApp(model, None, tmp_path / "t", GenerationConfig(min_words=1))
    assert last(no_bank.caption(str(root / "images" / ranking[0]), 3)) == ("aaa", "Done.")
    assert app.generating == 0
    (tmp_path / "x.png").write_text("no")
    assert last(app.caption(str(tmp_path / "x.png"), 3))[1].startswith("**Not captioned:**")


def test_serving_a_bank_of_another_model_is_refused_at_start(served, tmp_path):
    _, root, _ = served
    other = tmp_path / "bank"
    shutil.copytree(root / "bank", other)
    header = json.loads((other / "bank.json").read_text())
    (other / "bank.json").write_text(json.dumps({**header, "embedder": "0123456789abcdef"}))
    with pytest.raises(ValueError, match="embedded by model 0123456789abcdef, not by this model"):
        cli_main(["serve", str(root / "model"), "--bank", str(other)])


def test_slider_values_become_a_generation_config(tmp_path):
    app = DemoApp(tiny_fromage("opt"), None, tmp_path / "t")
    config = app.settings(0.7, 0.9, 12.0, 2.5, 3.0, 0.25)
    assert config == GenerationConfig(
        temperature=0.7,
        top_p=0.9,
        max_new_tokens=12,
        ret_scale=2.5,
        images_per_ret=3,
        min_score=0.25,
    )
    assert isinstance(config.max_new_tokens, int) and isinstance(config.images_per_ret, int)
