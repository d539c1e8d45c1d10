import pytest
import torch

from tokenizers_q import Codebook, kmeans


def test_ema_update_follows_the_formula():
    cb = Codebook(3, 4, kmeans_init=False, decay=0.9, eps=1e-5)
    embed0 = cb.embed.clone()
    x = torch.randn(50, 3)
    out = cb(x, update=True)
    counts = torch.bincount(out.indices, minlength=4).float()
    sums = torch.zeros(4, 3).index_add_(0, out.indices, x)
    size = 0.9 * torch.ones(4) + 0.1 * counts
    avg = 0.9 * embed0 + 0.1 * sums
    smoothed = (size + 1e-5) / (size.sum() + 4e-5) * size.sum()
    torch.testing.assert_close(cb.cluster_size, size)
    torch.testing.assert_close(cb.embed_avg, avg)
    torch.testing.assert_close(cb.embed, avg / smoothed[:, None])
    # the assignment used the codes as they were before the update
    assert torch.equal(out.indices, torch.cdist(x, embed0).argmin(-1))


def test_kmeans_init_runs_once_on_the_first_training_batch():
    x = torch.randn(300, 4)
    cb = Codebook(4, 8, kmeans_iters=5)
    assert not cb.initted
    cb(x, update=False)
    assert not cb.initted  # eval never initialises
    torch.manual_seed(7)
    cb(x, update=True)
    torch.manual_seed(7)
    ref = kmeans(x, 8, 5)
    assert cb.initted
    # after init the EMA step moves codes only slightly from the k-means centroids
    torch.testing.assert_close(cb.embed, ref.centroids, atol=0.05, rtol=0)
    before = cb.embed.clone()
    cb(x + 100, update=True)  # a second batch updates by EMA, it does not re-run k-means
    assert (cb.embed - before).abs().max() < 10


def test_dead_codes_are_revived_from_the_batch():
    cb = Codebook(2, 6, kmeans_init=False, threshold_ema_dead_code=0.6, decay=0.5)
    with torch.no_grad():
        cb.embed.copy_(torch.tensor([[0.0, 0.0]] + [[1000.0, 1000.0]] * 5))
        cb.embed_avg.copy_(cb.embed)
    x = torch.randn(64, 2) * 0.1
    out = cb(x, update=True)
    # code 0 took every vector; the five far codes decayed below threshold and now hold batch vectors
    assert (out.indices == 0).all()
    revived = cb.embed[1:]
    assert (revived.abs() < 1).all()
    assert ((revived[:, None] == x[None]).all(-1)).any(-1).all()
    assert cb.cluster_size[1:].tolist() == pytest.approx([0.6] * 5)
    assert out.metrics["dead_codes"] == 5  # reported before revival


def test_learnable_codes_are_parameters_and_get_gradients():
    cb = Codebook(4, 8, ema_update=False, kmeans_init=False)
    assert isinstance(cb.embed, torch.nn.Parameter)
    out = cb(torch.randn(10, 4), update=True)
    out.quantized.sum().backward()
    assert cb.embed.grad is not None and cb.embed.grad.abs().sum() > 0
    assert "embed" not in dict(Codebook(4, 8).named_parameters())


def test_cosine_codes_stay_unit_norm():
    cb = Codebook(5, 16, use_cosine_sim=True)
    for _ in range(3):
        cb(torch.randn(100, 5) * 4, update=True)
    torch.testing.assert_close(cb.embed.norm(dim=-1), torch.ones(16))


def test_metrics_describe_usage():
    cb = Codebook(2, 4, kmeans_init=False)
    with torch.no_grad():
        cb.embed.copy_(torch.tensor([[0.0, 0], [10, 0], [0, 10], [10, 10]]))
    x = torch.tensor([[0.1, 0], [9.9, 0], [0.2, 0], [10, 0.1]])
    m = cb(x).metrics
    assert m["usage"] == 0.5
    torch.testing.assert_close(m["perplexity"], torch.tensor(2.0))


def test_errors():
    with pytest.raises(ValueError, match="codebook_size must be a positive int, got 0"):
        Codebook(4, 0)
    with pytest.raises(ValueError, match="threshold_ema_dead_code must be >= 0"):
        Codebook(4, 4, threshold_ema_dead_code=-1)
    with pytest.raises(ValueError, match="kmeans_seeding must be one of"):
        Codebook(4, 4, kmeans_seeding="best")
