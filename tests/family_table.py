"""A pytest plugin that writes the supported-families table of the docs from the LM
family matrix (tests/test_lm_families.py) as it ran: with ``FROMAGE_FAMILY_TABLE=path``
set, a family is listed only if every check of the matrix passed for it."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import pytest

from tiny import FAMILIES, tiny_lm

MATRIX = "tests/test_lm_families.py"
outcomes: dict[str, dict[str, bool]] = defaultdict(dict)  # family -> test id -> passed


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.nodeid.startswith(MATRIX) or "[" not in report.nodeid:
        return
    if report.when == "call" or not report.passed:
        family = report.nodeid.rsplit("-", 1)[-1].rstrip("]").split("[")[-1]
        test = report.nodeid.split("::")[1]
        outcomes[family][test] = outcomes[family].get(test, True) and report.passed


def checks_run() -> list[str]:
    """The matrix's checks, as sentences made from their test names."""
    names = {test.split("[")[0] for tests in outcomes.values() for test in tests}
    return sorted(name.removeprefix("test_").replace("_", " ") for name in names)


def attention(config) -> str:
    """How the family's layers attend, read from its config as built for the matrix."""
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or [])
    if window is None or (kinds and "sliding_attention" not in kinds):
        return "full"
    return f"sliding ({window}) and full layers" if len(kinds) > 1 else f"sliding ({window})"


def table() -> str:
    passed = [f for f in FAMILIES if f in outcomes and all(outcomes[f].values())]
    failed = [f for f in FAMILIES if f in outcomes and f not in passed]
    lines = [
        "| family | `model_type` | for example | LM head | tokenizer | attention in the test |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for family in passed:
        spec = FAMILIES[family]
        tokenizer = ", ".join(
            [
                "BOS" if spec.bos else "no BOS",
                f"pad `{spec.pad.replace('|', chr(92) + '|')}`" if spec.pad else "no pad token",
                f"pads {spec.padding_side}",
            ]
        )
        lm = tiny_lm(family, vocab_size=64)
        tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
        lines.append(
            f"| {family} | `{spec.model_type}` | `{spec.example}` | "
            f"{'tied' if tied else 'untied'} | {tokenizer} | {attention(lm.config)} |"
        )
    lines += ["", "Each family listed passed every check of the matrix:", ""]
    lines += [f"- {check}" for check in checks_run()]
    if failed:
        lines += ["", "Failed, so not listed: " + ", ".join(failed) + "."]
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- family table: begin -->", "<!-- family table: end -->"


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("FROMAGE_FAMILY_TABLE")
    if not path or not outcomes:
        return
    page = Path(path).read_text()
    head, rest = page.split(BEGIN)
    _, tail = rest.split(END)
    Path(path).write_text(f"{head}{BEGIN}\n{table()}{END}{tail}")
