import pytest
import torch
from data_prep.synthetic import write_split

torch.set_num_threads(2)


def pytest_configure(config):
    # here, not in pyproject.toml: editing that would make `make setup` reinstall the venv
    config.addinivalue_line(
        "markers", "cluster: starts a two-node SLURM on this machine (root): make test-cluster"
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Tiny synthetic train (48 pairs) and val (12 pairs) shards, for short training runs."""
    root = tmp_path_factory.mktemp("shards")
    write_split(root / "train", n=48, per_shard=12, seed=0)
    write_split(root / "val", n=12, per_shard=12, seed=1)
    return root
