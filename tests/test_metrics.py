import pytest
import torch
import torch.nn.functional as F

from fromage.metrics import PairedRecall
from fromage.ranks import paired_ranks, recall_at_k, target_ranks
from fromage.train.module import warmup_step_decay


def test_ranks_count_better_and_tied_keys():
    queries = torch.eye(3)
    keys = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    # query 0: key 0 ties with key 1 -> rank 1; query 1: both better -> rank 2; query 2 first
    assert paired_ranks(queries, keys).tolist() == [1, 2, 0]
    assert torch.equal(paired_ranks(queries, keys, chunk=1), paired_ranks(queries, keys))
    scores = torch.tensor([[0.5, 0.9, float("-inf")], [0.1, 0.2, 0.3]])
    assert target_ranks(scores, torch.tensor([2, 0])).tolist() == [2, 2]
    assert recall_at_k(torch.tensor([0, 1, 4, 9]), [1, 5]) == {"R@1": 25.0, "R@5": 75.0}
    with pytest.raises(ValueError, match="recall@k of no queries"):  # not NaN
        recall_at_k(torch.empty(0, dtype=torch.long), [1])


def test_paired_recall_at_k_in_both_directions():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(50, 16), dim=-1)
    text = image.clone()
    text[:10] = F.normalize(torch.randn(10, 16), dim=-1)  # 10 queries lose their match
    metric = PairedRecall(ks=(1, 5, 50))
    metric.update(text[:20], image[:20])
    metric.update(text[20:], image[20:])
    result = metric.compute()
    assert result["n_pairs"] == 50
    assert 80 <= result["t2i_R@1"] < 90 and result["t2i_R@50"] == 100  # percent
    assert result["t2i_R@5"] >= result["t2i_R@1"]
    ranks = paired_ranks(text, image)
    assert result["t2i_R@1"] == pytest.approx(100 * (ranks < 1).float().mean().item())
    i2t = paired_ranks(image, text)
    assert result["i2t_R@1"] == pytest.approx(100 * (i2t < 1).float().mean().item())


def test_warmup_then_step_decay():
    schedule = warmup_step_decay(warmup_steps=10, decay_every_steps=100, decay_factor=0.1)
    assert schedule(0) == 0.1 and schedule(4) == 0.5 and schedule(9) == 1.0
    assert (
        schedule(99) == 1.0
        and abs(schedule(100) - 0.1) < 1e-12
        and abs(schedule(250) - 0.01) < 1e-12
    )
