import io
import math
import re
import sys

from fromage.train.run import plain_progress, train
from test_training import tiny_config
from tiny import tiny_fromage

TRAIN_LINE = re.compile(
    r"step (\d+)/5 \| (.+) \| ([\d.]+) samples/s \| elapsed (\d+:\d\d:\d\d)"
    r" \| remaining (\d+:\d\d:\d\d)"
)


def pairs(text: str) -> dict[str, float]:
    """``name value name value ...`` -> {name: value}."""
    words = text.split()
    return {name: float(value) for name, value in zip(words[::2], words[1::2], strict=True)}


def test_fit_with_stdout_not_a_terminal_prints_plain_lines(shards, tmp_path, capsys):
    config = tiny_config(
        shards,
        tmp_path,
        "trainer.max_steps=5",
        "trainer.log_every_n_steps=2",
        "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=true",  # asked for, but stdout is captured: no TTY
    )
    train(config, tiny_fromage("opt"))
    out, err = capsys.readouterr()
    assert "it/s" not in out + err  # the tqdm bar was turned off

    train_lines = [TRAIN_LINE.fullmatch(line) for line in out.splitlines()]
    train_lines = [m for m in train_lines if m]
    assert [int(m[1]) for m in train_lines] == [2, 4, 5]  # every 2 steps, and the last
    for m in train_lines:
        losses = pairs(m[2])
        assert list(losses) == ["loss", "caption_ce", "retrieval_ce", "contrastive"]
        assert all(math.isfinite(v) for v in losses.values()) and losses["loss"] > 0
        assert float(m[3]) > 0
    assert train_lines[-1][5] == "0:00:00"

    validations = [line for line in out.splitlines() if line.startswith("validation at step")]
    assert [int(line.split()[3]) for line in validations] == [2, 4]
    for line in validations:
        metrics = pairs(line.split(" | ", 1)[1])
        assert {"val/loss", "val/contrastive", "val/t2i_R@1", "val/i2t_R@5"} <= set(metrics)
        assert all(k.startswith("val/") and math.isfinite(v) for k, v in metrics.items())
        assert 0 <= metrics["val/t2i_R@1"] <= 100  # percent


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_unless_the_bar_is_wanted_and_can_draw(monkeypatch):
    assert plain_progress(True) and plain_progress(False)  # pytest's stdout is no TTY
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert not plain_progress(True)
    assert plain_progress(False)
