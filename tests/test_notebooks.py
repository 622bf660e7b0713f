"""The notebooks run headless (nbclient) so they never rot; they are committed without outputs."""

import re
from pathlib import Path

import nbformat
import pytest
from data_prep.synthetic import write_split
from nbclient import NotebookClient

from fromage.train.run import train
from test_training import tiny_config
from tiny import tiny_fromage

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str) -> list[dict]:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        notebook, timeout=600, resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    return [output for cell in notebook.cells for output in cell.get("outputs", [])]


def html_images(outputs: list[dict]) -> int:
    return sum(o.get("data", {}).get("text/html", "").count("<img") for o in outputs)


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebooks_are_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")


@pytest.mark.demo  # the trained demo model, as `make notebook` opens it after `make demo`
def test_generation_notebook_shows_what_the_demo_model_does(monkeypatch):
    model = NOTEBOOKS.parent / "runs" / "demo" / "pretrained"
    if not (model / "fromage.json").is_file():
        pytest.fail(f"this test needs the demo model in {model}: run `make demo`")
    for name in ("FROMAGE_MODEL", "FROMAGE_BANK", "FROMAGE_SHARDS", "FROMAGE_STORIES"):
        monkeypatch.delenv(name, raising=False)
    outputs = execute("interleaved_generation.ipynb")  # kernel in notebooks/, like JupyterLab
    texts = "".join(o.get("text", "") for o in outputs)
    assert "images in the bank; training prompt: 'A picture of'" in texts
    right = int(re.search(r"(\d) of 4 captions name the colour, shape and place", texts)[1])
    # a bar below every demo model measured, not one machine's count: under AVX2 kernels
    # 2 of 4 were right, the lowest measured; a model blind to the image names all
    # three attributes of 1 image in 200, so even 1 of 4 is 50x chance
    assert right >= 1
    assert texts.count("the story's last image") == 3
    # what the notebook shows whatever the trajectory: 4 input images, 3 x 4 retrievals,
    # 3 stories x (4 context + 3 retrieved); a caption's own [RET] may add one image more
    assert html_images(outputs) >= 4 + 12 + 21


def test_curves_notebook_plots_a_run(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    write_split(shards / "train", n=24, per_shard=12, seed=0)
    write_split(shards / "val", n=12, per_shard=12, seed=1)
    train(tiny_config(shards, tmp_path), tiny_fromage("opt"))
    monkeypatch.setenv("FROMAGE_RUN", str(tmp_path / "demo"))
    outputs = execute("training_curves.ipynb")
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
    assert any("val/t2i_R@1" in o.get("text", "") for o in outputs)
