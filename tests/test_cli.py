import io
import json
import shutil
import subprocess
import sys

import pytest
import torch.nn.functional as F

from fromage.cli import main, parse_message
from fromage.data.image_sources import ImageLoadError
from fromage.infer.bank import BankFileError, ImageBank
from fromage.model.fromage import FromageModel
from fromage.model.pretrained import save_pretrained
from test_bank import COLOURS, overwrite_tensor_bytes, write_images
from test_generation import force_ret
from tiny import tiny_model_config


def make_chatty(root):
    """A saved model whose LM always wants [RET] (a constant final state u with [RET] = 100 u)
    and says "a" while [RET] is forbidden, plus a bank of six images; returns the bank ids
    in the order the model ranks them."""
    model = FromageModel.from_config(tiny_model_config(root / "lm"))
    u, _ = force_ret(model, token="a")
    model.lm.save_pretrained(root / "lm")
    save_pretrained(model, root / "model")
    write_images(root / "images", COLOURS)
    args = ["bank", str(root / "model"), "--folder", str(root / "images"), "--out"]
    assert main([*args, str(root / "bank")]) == 0
    query = F.normalize(model.ret_to_shared[0](u), dim=-1)
    bank = ImageBank.open(root / "bank")
    return [bank.ids[i] for i in (bank.embeddings @ query).argsort(descending=True)]


@pytest.fixture(scope="module")
def chatty(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return root, make_chatty(root)


def test_chat_with_piped_stdin_prints_interleaved_text_and_images(chatty):
    root, ranking = chatty
    image = root / "images" / ranking[0]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fromage.cli",
            "chat",
            str(root / "model"),
            "--bank",
            str(root / "bank"),
            "--max-new-tokens",
            "4",
            "--min-words",
            "2",
        ],
        input=f"what is this? <img {image}>\n<img {root / 'missing.png'}>\nmore\n/quit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    read, *lines = [line for line in result.stdout.splitlines() if line]
    assert read.startswith("(read the image as: ")  # a question: the image captioned first
    # the image given as input is never retrieved back: the next two of the ranking are
    assert lines[0].startswith(f"fromage> aa [image {ranking[1]} ")
    assert f"[image {ranking[2]} " in lines[0] and f"[image {ranking[0]} " not in lines[0]
    assert lines[1].startswith("(could not open an image:")
    # a later turn does not repeat images retrieved earlier in the conversation
    assert lines[2].startswith(f"fromage> aa [image {ranking[3]} ")
    assert f"[image {ranking[4]} " in lines[2]


def test_blank_lines_and_a_missing_image_in_chat_keep_the_conversation(chatty, monkeypatch, capsys):
    root, ranking = chatty
    image = root / "images" / ranking[0]
    lines = f"what is this? <img {image}>\n\n   \n<img {root / 'missing.png'}>\nmore\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    args = ["chat", str(root / "model"), "--bank", str(root / "bank"), "--max-new-tokens", "4"]
    assert main([*args, "--min-words", "2"]) == 0
    read, *printed = capsys.readouterr().out.splitlines()
    assert read.startswith("(read the image as: ")  # a question: its image captioned first
    assert len(printed) == 3 and printed[1].startswith("(could not open an image:")
    # the third answer goes on from the first: it shows the images after those shown then
    assert printed[2].startswith(f"fromage> aa [image {ranking[3]} ")


def test_retrieve_lists_the_bank_ranking(chatty, capsys):
    root, ranking = chatty
    assert (
        main(["retrieve", str(root / "model"), "--bank", str(root / "bank"), "-k", "3", "a red"])
        == 0
    )
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in printed] == ranking[:3]


@pytest.mark.parametrize("k", ["0", "-1", "two"])
def test_retrieve_refuses_a_k_under_one_before_loading(k, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["retrieve", "no-model", "--bank", "no-bank", "-k", k, "a red"])
    assert exit.value.code == 2
    assert f"argument -k: {k!r} is not a whole number of at least 1" in capsys.readouterr().err


def test_retrieve_refuses_a_damaged_bank_naming_its_file(chatty, tmp_path):
    root, _ = chatty
    shutil.copytree(root / "bank", tmp_path / "bank")
    overwrite_tensor_bytes(tmp_path / "bank" / "part-00000.safetensors")
    with pytest.raises(BankFileError, match=r"part-00000\.safetensors: .*vectors are not finite"):
        main(["retrieve", str(root / "model"), "--bank", str(tmp_path / "bank"), "a red"])


def test_bank_command_resumes_and_counts(chatty, capsys):
    root, _ = chatty
    write_images(root / "more", COLOURS[:2], start=10)
    args = [
        "bank",
        str(root / "model"),
        "--folder",
        str(root / "more"),
        "--out",
        str(root / "bank2"),
        "--thumbnail-size",
        "8",
    ]
    main(args)
    main(args)
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .endswith("added 0, already there 2, unreadable 0; 2 images in all")
    )
    assert ImageBank.open(root / "bank2").thumbnail("img10.png").size == (8, 8)


def test_parse_message_splits_text_and_images(chatty):
    root, ranking = chatty
    first, second = root / "images" / ranking[0], root / "images" / ranking[1]
    items, sources = parse_message(f"look <img {first}> and <img  {second} > ok")
    assert [type(i).__name__ for i in items] == ["str", "Image", "str", "Image", "str"]
    assert sources == [str(first), str(second)]
    with pytest.raises(ImageLoadError):
        parse_message("<img /nonexistent.png>")


def test_bank_and_index_commands_store_the_chosen_index(chatty, capsys):
    pytest.importorskip("faiss")
    root, ranking = chatty
    args = ["bank", str(root / "model"), "--folder", str(root / "images")]
    assert main([*args, "--out", str(root / "flat"), "--index", "Flat"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{root / 'flat'}: Flat search index over 6 images"
    )
    assert json.loads((root / "flat" / "bank.json").read_text())["index"]["factory"] == "Flat"
    retrieve = ["retrieve", str(root / "model"), "--bank", str(root / "flat"), "-k", "6", "a"]
    assert main(retrieve) == 0
    printed = capsys.readouterr()
    assert [line.split()[2] for line in printed.out.splitlines()] == ranking
    assert "(Flat search over 6 images)" in printed.err

    assert main(["index", str(root / "flat"), "--index", "exact"]) == 0
    assert capsys.readouterr().out.strip() == f"{root / 'flat'}: exact search index over 6 images"
    assert ImageBank.open(root / "flat").search_kind == "exact"
    assert main([*args, "--out", str(root / "flat")]) == 0  # nothing new: index kept
    assert "search index" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="'PQ7' is neither"):
        main([*args, "--out", str(root / "other"), "--index", "PQ7"])
    assert not (root / "other").exists()  # refused before anything was embedded
