"""The web demo in a real browser: Debian's Chromium driven by Playwright."""

import hashlib
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gradio.utils import get_upload_folder
from PIL import Image
from playwright.sync_api import expect, sync_playwright
from transformers import OPTConfig, OPTForCausalLM

from fromage.bench.web import (
    Turn,
    Visitor,
    chat_settings,
    converse,
    free_port,
    held_out,
    reference_replies,
)
from fromage.cli import AUTH_ENV, serve_auth
from fromage.cli import main as cli_main
from fromage.data.datamodule import shard_list
from fromage.eval.attributes import names_exactly, parse, shard_attributes, vocabulary_of
from fromage.infer.bank import ImageBank
from fromage.infer.generation import GenerationConfig
from fromage.model.fromage import FromageModel
from fromage.model.load import load_model
from fromage.web.app import EMPTY_REPLY, DemoApp, launch
from fromage.web.uploads import MAX_UPLOAD_BYTES, UploadError, read_upload
from test_cli import make_chatty
from test_generation import force_ret
from tiny import make_tokenizer, tiny_clip_tower, tiny_fromage, tiny_lm, tiny_model_config

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
# set (make screenshot does) to write the README's picture of the demo model answering
SCREENSHOT_DIR = os.environ.get("FROMAGE_SCREENSHOT_DIR")


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
    if not CHROMIUM.exists():  # a failure, not a skip: CI must not pass without the browser
        pytest.fail(f"the browser tests need Chromium at {CHROMIUM}: run `make browser`")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def send(page, text: str, files: list[Path] = ()) -> None:
    if files:
        page.locator("#message input[type=file]").set_input_files([str(f) for f in files])
        # sent before its upload ends, a message would go without its images
        expect(page.locator("#message .thumbnail-item")).to_have_count(len(files), timeout=30_000)
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
    page.screenshot(path=str(tmp_path / "web_demo.png"))
    assert (tmp_path / "web_demo.png").stat().st_size > 10_000

    # a text file named as an image passes the page's filter and is refused by the server
    # with a message; the conversation and the server go on
    (tmp_path / "notes.png").write_text("not an image")
    send(page, "and this?", [tmp_path / "notes.png"])
    expect(page.locator("#status")).to_contain_text("notes.png is not an image", timeout=30_000)
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


QA_SETTINGS = chat_settings(GenerationConfig(max_new_tokens=3))  # "a" and two [RET]s


def test_visitors_at_once_each_get_their_own_answers(served, tmp_path):
    url, root, ranking = served
    # visitor i shows bank image i (never retrieved for them), then asks for more: each
    # reply depends on that visitor's own turns only
    talks = [[Turn("what is this?", root / "images" / name), Turn("more")] for name in ranking[:4]]
    alone = DemoApp(
        load_model(root / "model"),
        ImageBank.open(root / "bank"),
        tmp_path / "t",
        GenerationConfig(min_words=1),
        layout="qa",
    )
    expected = [reference_replies(alone, talk, QA_SETTINGS) for talk in talks]
    assert expected[0][0].images != expected[1][0].images  # the check can tell them apart
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda talk: converse(url, talk, QA_SETTINGS), talks))
    for replies, wanted in zip(got, expected, strict=True):
        assert [(r.text, r.images) for r in replies] == [(w.text, w.images) for w in wanted]
        assert all(r.first_s is not None and r.first_s <= r.total_s for r in replies)


def test_only_the_demos_own_files_can_be_fetched(served):
    url, root, ranking = served
    visitor = Visitor(url, settings=QA_SETTINGS)
    visitor.chat("what is this?", [root / "images" / ranking[0]])
    shown = [
        part["file"]["path"]
        for message in visitor.history
        for part in message["content"]
        if part.get("type") == "file"
    ]
    assert len(shown) == 3  # the upload and two retrieved thumbnails
    for path in shown:
        assert httpx.get(f"{url}/gradio_api/file={path}").status_code == 200
    checkout = Path(__file__).resolve().parents[1]
    for path in ["/etc/passwd", checkout / "pyproject.toml", root / "model" / "fromage.json"]:
        response = httpx.get(f"{url}/gradio_api/file={path}")
        assert response.status_code in (403, 404), path
        assert "root:" not in response.text and "[project]" not in response.text
    visitor.close()


def test_uploads_over_the_limit_are_refused_before_they_are_written(served, tmp_path):
    url, _, _ = served
    started = time.time()
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (MAX_UPLOAD_BYTES + 1))
    with big.open("rb") as file:
        response = httpx.post(f"{url}/gradio_api/upload", files={"files": ("big.png", file)})
    assert response.status_code == 413
    written = [
        p
        for p in Path(get_upload_folder()).rglob("*")
        if p.is_file() and p.stat().st_mtime >= started and p.stat().st_size > MAX_UPLOAD_BYTES
    ]
    assert written == []


def test_a_login_is_asked_for_and_old_uploads_are_deleted(tmp_path):
    model = tiny_fromage("opt")
    app = DemoApp(model, None, tmp_path / "t", GenerationConfig(max_new_tokens=2))
    port = free_port()
    page = launch(app, "127.0.0.1", port, block=False, auth=("ada", "lovelace"), cache_seconds=1)
    url = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(f"{url}/config").status_code == 401
        with pytest.raises(ValueError, match="Could not login"):
            Visitor(url, auth=("ada", "wrong"))
        visitor = Visitor(url, auth=("ada", "lovelace"))
        Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
        visitor.chat("", [tmp_path / "red.png"])  # an image alone: a 2-token caption
        upload = Path(visitor.history[0]["content"][0]["file"]["path"])
        assert upload.is_file()
        deadline = time.monotonic() + 30
        while upload.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not upload.exists()  # deleted a second after it was made
        visitor.close()
    finally:
        page.close()


def test_serving_a_network_without_a_login_warns(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(AUTH_ENV, raising=False)
    with pytest.raises(FileNotFoundError):
        cli_main(["serve", str(tmp_path / "no-model"), "--host", "0.0.0.0"])
    assert "WARNING: serving on 0.0.0.0 without a login" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        cli_main(["serve", str(tmp_path / "no-model"), "--host", "127.0.0.1"])
    assert "WARNING" not in capsys.readouterr().err
    (tmp_path / "login").write_text("ada:love:lace\n")
    monkeypatch.setenv(AUTH_ENV, "bob:builder")
    with pytest.raises(FileNotFoundError):
        cli_main(["serve", str(tmp_path / "no-model"), "--host", "0.0.0.0"])
    assert "WARNING" not in capsys.readouterr().err
    assert serve_auth(None, tmp_path / "login", "bob:builder") == ("ada", "love:lace")
    assert serve_auth("eve:x", tmp_path / "login", None) == ("eve", "x")
    assert serve_auth(None, None, "bob:builder") == ("bob", "builder")
    assert serve_auth(None, None, None) is None
    with pytest.raises(SystemExit, match="USER:PASSWORD"):
        serve_auth("nocolon", None, None)


def slow_forced_model(root) -> FromageModel:
    """A 24-layer, 256-wide OPT forced to say "a" forever (no bank: no [RET]): a reply of
    hundreds of tokens takes seconds, long enough to leave in the middle of it."""
    tokenizer = make_tokenizer()
    lm = OPTConfig(
        vocab_size=len(tokenizer) + 8,
        hidden_size=256,
        word_embed_proj_dim=256,
        num_hidden_layers=24,
        ffn_dim=512,
        num_attention_heads=4,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    OPTForCausalLM(lm).save_pretrained(root / "slow-lm")
    tokenizer.save_pretrained(root / "slow-lm")
    config = tiny_model_config(root / "unused-lm")
    config.lm.name = str(root / "slow-lm")
    model = FromageModel.from_config(config).eval()
    force_ret(model, token="a")
    return model


@pytest.mark.slow  # a 24-layer LM, so that a reply lasts long enough to leave it
def test_a_queued_visitor_sees_the_queue_and_closing_a_tab_stops_its_reply(served, browser):
    _, root, _ = served
    app = DemoApp(slow_forced_model(root), None, root / "t2", GenerationConfig(max_new_tokens=500))
    port = free_port()
    server = launch(app, "127.0.0.1", port, block=False, concurrency=1)  # one at a time
    pages = []
    for _ in range(2):
        context = browser.new_context()
        pages.append(context.new_page())
        pages[-1].goto(f"http://127.0.0.1:{port}")
        pages[-1].wait_for_selector("#message textarea", timeout=60_000)
    first, second = pages
    send(first, "say a")
    expect(first.locator("#chat [data-testid='bot']").first).to_contain_text("aa", timeout=60_000)
    send(second, "say a")  # waits for the first reply: the page says so
    queued = second.locator("#chat").get_by_text(re.compile(r"queue: 1/1"))
    expect(queued).to_be_visible(timeout=30_000)
    first.context.close()  # the first visitor leaves mid-reply; the second's reply starts
    expect(second.locator("#chat [data-testid='bot']").first).to_contain_text("aa", timeout=60_000)
    assert app.left_early == 1  # the first reply stopped, not run to its end
    second.context.close()
    deadline = time.monotonic() + 30
    while app.generating and time.monotonic() < deadline:
        time.sleep(0.2)
    assert app.generating == 0 and app.left_early == 2
    server.close()


# ----------------------------------------------------------------- the trained demo model
CHECKOUT = Path(__file__).resolve().parents[1]
DEMO_RUN = CHECKOUT / "runs" / "demo"
HELD_OUT = CHECKOUT / "data" / "synthetic" / "val"


def demo_model_and_bank():
    """The model and bank `make demo` writes; their absence fails a demo test."""
    if not (DEMO_RUN / "pretrained" / "fromage.json").is_file() or not (DEMO_RUN / "bank").is_dir():
        pytest.fail(f"the demo tests need the demo model in {DEMO_RUN}: run `make demo`")
    return load_model(DEMO_RUN / "pretrained"), ImageBank.open(DEMO_RUN / "bank")


@pytest.fixture(scope="module")
def demo_served(tmp_path_factory):
    """The demo model and its bank served as `make serve` serves them (its default layout)."""
    model, bank = demo_model_and_bank()
    app = DemoApp(model, bank, tmp_path_factory.mktemp("demo-thumbnails"))
    port = free_port()
    page = launch(app, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}", app
    page.close()


def bot_text(page) -> str:
    return " ".join(page.locator("#chat [data-testid='bot']").all_inner_texts())


def shown_ids(page) -> list[str]:
    """The bank ids of the images in the reply ("id · score s" under each)."""
    return [t.split(" · ")[0].strip("` ") for t in bot_text(page).split("\n") if " · score" in t]


def open_with_held_out(browser, url: str, tmp_path: Path):
    """The page, 10 held-out images to upload (path, attributes), every held-out image's
    attributes and their vocabulary."""
    images = held_out(str(HELD_OUT), 10, tmp_path / "images")
    truths = shard_attributes(shard_list(str(HELD_OUT)))
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#message textarea", timeout=60_000)
    return page, images, truths, vocabulary_of(list(truths.values()))


@pytest.mark.demo
def test_the_demo_model_captions_held_out_uploads_and_retrieves_descriptions(
    demo_served, browser, tmp_path
):
    url, app = demo_served
    assert app.layout == "plain"  # the 135M LM does not follow Q:/A:
    page, images, truths, vocabulary = open_with_held_out(browser, url, tmp_path)
    expect(page.locator("#layout-note")).to_contain_text("Layout (this model's default): plain")
    right, replies = 0, []
    for path, truth in images:  # an image alone: the page adds the training prompt
        page.locator("#clear").click()
        expect(page.locator("#chat [data-testid='user']")).to_have_count(0, timeout=30_000)
        send(page, "", [path])
        expect(page.locator("#status")).to_have_text("Done.", timeout=120_000)
        text = bot_text(page)
        replies.append((truth, text))
        right += names_exactly(text.split("\n")[0], truth, vocabulary)
    # below every demo model measured (the lowest: 7 of 10, under AVX2 kernels);
    # a model blind to the image names all three attributes of 1 image in 200
    assert right >= 6, replies

    found = 0
    for _, truth in images[:3]:  # a description: the model answers with a bank image
        description = "a {colour} {shape} at the {place}".format(**truth)
        page.locator("#clear").click()
        expect(page.locator("#chat [data-testid='user']")).to_have_count(0, timeout=30_000)
        send(page, description)
        expect(page.locator("#status")).to_have_text("Done.", timeout=120_000)
        ids = shown_ids(page)
        assert len(ids) == 1, bot_text(page)
        found += truths[ids[0]] == truth
    assert found >= 2
    if SCREENSHOT_DIR:  # the README's picture: an upload, its caption and retrieved image
        page.locator("#clear").click()
        send(page, "", [images[0][0]])
        expect(page.locator("#status")).to_have_text("Done.", timeout=120_000)
        page.screenshot(path=str(Path(SCREENSHOT_DIR) / "web_demo.png"), full_page=True)
    page.close()


# a newcomer's questions about an upload, and the attributes a right answer names
IMAGE_QUESTIONS = {
    "What is in this picture?": ("colour", "shape"),
    "Describe this image": ("colour", "shape"),
    "What colour is the shape?": ("colour",),
    "Where is the shape?": ("place",),
    "What shape is this?": ("shape",),
}


@pytest.mark.demo
def test_the_demo_model_answers_questions_about_held_out_uploads(demo_served, browser, tmp_path):
    page, images, _, vocabulary = open_with_held_out(browser, demo_served[0], tmp_path)
    for question, asked in IMAGE_QUESTIONS.items():
        right, replies = 0, []
        for path, truth in images:
            page.locator("#clear").click()
            expect(page.locator("#chat [data-testid='user']")).to_have_count(0, timeout=30_000)
            send(page, question, [path])
            expect(page.locator("#status")).to_have_text("Done.", timeout=120_000)
            read, answer, *_ = page.locator("#chat [data-testid='bot']").all_inner_texts()
            replies.append((truth, read, answer))
            assert read.startswith("Read the image as:"), replies  # shown before the answer
            assert answer.strip() and "ended its reply" not in answer, replies
            named = parse(answer, vocabulary)
            right += all(named[a] == truth[a] for a in asked)
        # answers come from the model's captions, so the captions' bar (above) holds here
        # too; on the default kernels of a 2-core x86-64 machine 8 to 10 of 10 are right
        assert right >= 6, (question, replies)
    page.close()


def test_a_question_about_an_image_is_answered_from_the_models_caption(tmp_path):
    tokenizer = make_tokenizer()  # an LM of 512 positions: room for the worked example
    lm = tiny_lm("opt", len(tokenizer), positions=512)
    model = FromageModel(lm, tokenizer, tiny_clip_tower(), input_prompt="A picture of")
    app = DemoApp(model, None, tmp_path / "t", GenerationConfig(max_new_tokens=3))
    dialogue = app.new_dialogue("plain")
    image = tmp_path / "i.png"
    Image.new("RGB", (8, 8), "red").save(image)
    message = {"text": "What colour is it?", "files": [str(image)]}
    *_, (shown, dialogue, status, _) = app.chat(message, [], dialogue, *chat_settings())
    assert status == "Done."
    read, answer = [m["content"] for m in shown if m["role"] == "assistant"]
    assert read.startswith("*Read the image as:* A picture of ")
    caption = read.removeprefix("*Read the image as:* A picture of ")
    (prompt,) = dialogue.prompt()  # text: the example, the image's caption, the question
    assert prompt.startswith("A picture of a brown dog")
    assert prompt.endswith(f"\n\nA picture of {caption.rstrip('.')}.\nQ: What colour is it?\nA:")
    assert answer.strip() and len(dialogue.turns) == 1


def test_a_reply_without_text_or_image_says_what_happened(tmp_path):
    model = tiny_fromage("opt")
    force_ret(model, token="</s>")  # without a bank: EOS first, an empty reply
    app = DemoApp(model, None, tmp_path / "t", layout="qa")
    message = {"text": "hello", "files": []}
    *_, (shown, _, status, _) = app.chat(message, [], app.new_dialogue(), *chat_settings())
    assert shown[-1] == {"role": "assistant", "content": EMPTY_REPLY}
    assert status == "The model gave an empty reply."
