import torch
import torch.nn.functional as F

from fromage.metrics import PairedRecall, rank_of_positive
from fromage.train.module import warmup_step_decay


def test_rank_of_positive_counts_better_and_tied_keys():
    queries = torch.eye(3)
    keys = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    # query 0: key 0 ties with key 1 -> rank 1; query 1: both better -> rank 2; query 2 first
    assert rank_of_positive(queries, keys).tolist() == [1, 2, 0]
    assert torch.equal(rank_of_positive(queries, keys, chunk=1), rank_of_positive(queries, keys))


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
    assert 0.8 <= result["t2i_R@1"] < 0.9 and result["t2i_R@50"] == 1.0
    assert result["t2i_R@5"] >= result["t2i_R@1"]
    ranks = rank_of_positive(text, image)
    assert result["t2i_R@1"] == (ranks < 1).float().mean()
    assert result["i2t_R@1"] == (rank_of_positive(image, text) < 1).float().mean()


def test_warmup_then_step_decay():
    schedule = warmup_step_decay(warmup_steps=10, decay_every_steps=100, decay_factor=0.1)
    assert schedule(0) == 0.1 and schedule(4) == 0.5 and schedule(9) == 1.0
    assert (
        schedule(99) == 1.0
        and abs(schedule(100) - 0.1) < 1e-12
        and abs(schedule(250) - 0.01) < 1e-12
    )
