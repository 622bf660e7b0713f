"""The README and docs/ stand on their own: every relative link and image resolves inside
the clone (to a file, and to a heading where it names one), and none points outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
# [text](target "title") and ![alt](target), reference definitions, HTML src/href
INLINE = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML = re.compile(r"""<(?:img|a)\b[^>]*\b(?:src|href)=["']([^"']+)["']""", re.I)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...


def link_targets(markdown: str) -> list[str]:
    """Every link and image target of a Markdown page, code blocks and spans left out."""
    text = CODE_SPAN.sub("", FENCE.sub("", markdown))
    return [m.group(1) for pattern in (INLINE, REFERENCE, HTML) for m in pattern.finditer(text)]


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces
    as hyphens, a repeated heading suffixed -1, -2, ..."""
    anchors, seen = set(), {}
    for line in FENCE.sub("", markdown).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """``target: why`` for each relative link of ``page`` that does not resolve in ``root``."""
    problems = []
    for target in link_targets(page.read_text()):
        if EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.is_relative_to(root):
            problems.append(f"{target}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
        elif (
            anchor
            and resolved.suffix == ".md"
            and anchor not in heading_anchors(resolved.read_text())
        ):
            problems.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves_inside_the_clone(page):
    assert broken_links(page) == []


def test_the_readme_links_the_method_page_and_every_docs_page_is_reachable():
    linked = set()
    for page in PAGES:
        for target in link_targets(page.read_text()):
            if not EXTERNAL.match(target) and target.partition("#")[0]:
                linked.add((page.parent / target.partition("#")[0]).resolve())
    assert (ROOT / "docs" / "method.md").resolve() in linked
    unreachable = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert unreachable == []


def test_the_checker_reports_missing_files_outside_paths_and_missing_headings(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Precision: what runs, and why\n\n## `make x`\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md#precision-what-runs-and-why) [ok](docs/a.md#make-x) "
        "![pic](docs/missing.png) [out](../elsewhere/spec.md) [web](https://example.com) "
        "[bad anchor](docs/a.md#speed)\n\n```\n[in code](nowhere.md)\n```\n"
        '`[in a span](nowhere.md)` <img src="docs/gone.png">\n\n[ref]: docs/none.md\n'
    )
    assert sorted(broken_links(page, tmp_path)) == [
        "../elsewhere/spec.md: outside the repository",
        "docs/a.md#speed: no heading #speed in a.md",
        "docs/gone.png: no such file",
        "docs/missing.png: no such file",
        "docs/none.md: no such file",
    ]


def test_make_alone_lists_every_target_with_a_line():
    makefile = (ROOT / "Makefile").read_text()
    targets = re.findall(r"^([a-z][a-z0-9-]*):", makefile, flags=re.MULTILINE)
    listed = subprocess.run(
        ["make", "-s", "-C", str(ROOT)], capture_output=True, text=True, check=True
    ).stdout
    shown = dict(line.split(maxsplit=1) for line in listed.splitlines())
    assert sorted(shown) == sorted(targets) and len(targets) > 15
    assert all(len(text) > 10 for text in shown.values()), shown
