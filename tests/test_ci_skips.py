"""In CI a skip is a failure, unless it names optional hardware (tests/conftest.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIPPING_TESTS = """
import pytest

def test_needs_a_browser():
    pytest.skip("needs Debian's chromium (make browser installs it)")

@pytest.mark.skipif(True, reason="needs a CUDA GPU")
def test_needs_cuda():
    pass

def test_needs_a_library():
    pytest.importorskip("no_such_library_anywhere")

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_bug():
    assert False
"""


def outcomes(directory: Path, ci: str | None) -> dict[str, str]:
    """Run the tests in ``directory``: test name -> passed, failed or skipped (JUnit XML)."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    # the conftest imports data_prep and loads tests/family_table.py as a plugin
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    if ci is not None:
        env["CI"] = ci
    report = directory / "report.xml"
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={report}"]
    run = subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True)
    assert report.exists(), run.stdout + run.stderr
    cases = ElementTree.parse(report).getroot().iter("testcase")
    return {
        case.get("name"): next(
            (child.tag for child in case if child.tag in ("failure", "skipped")), "passed"
        ).replace("failure", "failed")
        for case in cases
    }


@pytest.mark.slow  # two pytest processes, each importing torch
@pytest.mark.parametrize(("ci", "expected"), [(None, "skipped"), ("true", "failed")])
def test_skips_fail_in_ci_but_not_for_optional_hardware(tmp_path, ci, expected):
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_skipping.py").write_text(SKIPPING_TESTS)
    found = outcomes(tmp_path, ci)
    assert found["test_needs_a_browser"] == found["test_needs_a_library"] == expected
    assert found["test_needs_cuda"] == found["test_known_bug"] == "skipped"  # xfail: skipped
