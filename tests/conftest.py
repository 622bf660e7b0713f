import os

import pytest
import torch
from data_prep.synthetic import write_split

torch.set_num_threads(2)

# writes the docs' supported-families table from the LM family matrix (make docs-families)
pytest_plugins = ["family_table"]

# Words in a skip reason that name optional hardware: the only skips CI accepts
OPTIONAL_HARDWARE = ("CUDA", "GPU")


def in_ci() -> bool:
    """CI services set ``CI=true``; there a skipped test hides what a user would hit."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skip is a failure (a missing browser, system package or library is what a
    user would meet), unless it names optional hardware such as CUDA."""
    report = yield
    if report.skipped and in_ci() and not hasattr(report, "wasxfail"):
        reason = skip_reason(report)
        if not any(word in reason for word in OPTIONAL_HARDWARE):
            report.outcome = "failed"
            report.longrepr = (
                f"skipped in CI, where everything a user needs must be there: {reason}"
            )
    return report


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Tiny synthetic train (48 pairs) and val (12 pairs) shards, for short training runs."""
    root = tmp_path_factory.mktemp("shards")
    write_split(root / "train", n=48, per_shard=12, seed=0)
    write_split(root / "val", n=12, per_shard=12, seed=1)
    return root
