"""The notebooks run headless (nbclient) so they never rot; they are committed without outputs."""

from pathlib import Path

import nbformat
import pytest
from data_prep.synthetic import write_split
from nbclient import NotebookClient

from fromage.config import compose
from fromage.model.fromage import FromageModel
from fromage.model.pretrained import save_pretrained
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


@pytest.mark.slow  # about 40 s: SmolLM2 and the demo's tower architecture
def test_generation_notebook_shows_images_from_the_demo_sized_model(tmp_path, monkeypatch):
    write_split(tmp_path / "val", n=16, per_shard=8, seed=1)
    # its tower at random: the notebook needs no pre-trained weights (data/tower/)
    model_config = compose("demo", ["model.vision.checkpoint=null"]).model
    save_pretrained(FromageModel.from_config(model_config), tmp_path / "model")
    monkeypatch.setenv("FROMAGE_MODEL", str(tmp_path / "model"))
    monkeypatch.setenv("FROMAGE_BANK", str(tmp_path / "bank"))
    monkeypatch.setenv("FROMAGE_SHARDS", str(tmp_path / "val"))
    outputs = execute("interleaved_generation.ipynb")
    assert any("16 images in the bank" in o.get("text", "") for o in outputs)
    # 3 inputs + 3 x 4 retrievals + 2 context images, at least
    assert html_images(outputs) >= 17
    assert (tmp_path / "bank" / "bank.json").exists()


def test_curves_notebook_plots_a_run(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    write_split(shards / "train", n=24, per_shard=12, seed=0)
    write_split(shards / "val", n=12, per_shard=12, seed=1)
    train(tiny_config(shards, tmp_path), tiny_fromage("opt"))
    monkeypatch.setenv("FROMAGE_RUN", str(tmp_path / "demo"))
    outputs = execute("training_curves.ipynb")
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
    assert any("val/t2i_R@1" in o.get("text", "") for o in outputs)
