import pytest
import torch

from tokenizers_q import kmeans
from tokenizers_q.kmeans import residual_kmeans


def _blobs(n_per=200, centers=None, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = centers if centers is not None else torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]])
    x = torch.cat([c + noise * torch.randn(n_per, 2, generator=g) for c in centers])
    return x, centers


def test_kmeanspp_recovers_separated_clusters():
    x, centers = _blobs()
    g = torch.Generator().manual_seed(1)
    res = kmeans(x, 4, kmeans_iters=20, generator=g)
    found = res.centroids[torch.cdist(centers, res.centroids).argmin(-1)]
    torch.testing.assert_close(found, centers, atol=0.05, rtol=0)
    assert res.cluster_weights.tolist() == [200.0] * 4
    # assignments are the nearest centroids, inertia their summed squared distances
    assert torch.equal(res.assignments, torch.cdist(x, res.centroids).argmin(-1))
    torch.testing.assert_close(res.inertia, (x - res.centroids[res.assignments]).pow(2).sum(), rtol=1e-4, atol=1e-4)


def test_random_seeding_picks_distinct_data_points():
    x = torch.randn(50, 3)
    res = kmeans(x, 10, kmeans_iters=0, init="random", generator=torch.Generator().manual_seed(0))
    matches = (res.centroids[:, None] == x[None]).all(-1)
    assert matches.any(-1).all() and matches.float().argmax(-1).unique().numel() == 10


def test_kmeanspp_beats_random_seeding_on_unbalanced_data():
    # one huge cluster and three small far ones: random seeds land mostly in the big one
    x, _ = _blobs()
    x = torch.cat([x[:200].repeat(20, 1), x[200:]])
    pp = [kmeans(x, 4, 0, init="kmeans++", generator=torch.Generator().manual_seed(s)).inertia for s in range(10)]
    rnd = [kmeans(x, 4, 0, init="random", generator=torch.Generator().manual_seed(s)).inertia for s in range(10)]
    assert torch.stack(pp).median() < 0.1 * torch.stack(rnd).median()


def test_weights_pull_centroids():
    x = torch.tensor([[0.0], [1.0]])
    res = kmeans(x, 1, kmeans_iters=3, weights=torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(res.centroids, torch.tensor([[0.25]]))
    assert res.cluster_weights.item() == 4.0


def test_zero_weight_points_are_never_seeds():
    x = torch.cat([torch.zeros(5, 2), 100 + torch.randn(50, 2)])
    w = torch.cat([torch.zeros(5), torch.ones(50)])
    res = kmeans(x, 3, kmeans_iters=0, weights=w, generator=torch.Generator().manual_seed(0))
    assert (res.centroids > 50).all()


def test_batched_equals_independent_problems():
    xs = torch.randn(3, 120, 4)
    batched = kmeans(xs, 6, kmeans_iters=5, generator=torch.Generator().manual_seed(0))
    assert batched.centroids.shape == (3, 6, 4) and batched.assignments.shape == (3, 120)
    for b in range(3):
        # every problem is a fixed point of one more Lloyd step from its own centroids
        assign = torch.cdist(xs[b], batched.centroids[b]).argmin(-1)
        assert torch.equal(assign, batched.assignments[b])


def test_seeded_determinism_and_fewer_points_than_clusters():
    x = torch.randn(5, 3)
    a = kmeans(x, 8, generator=torch.Generator().manual_seed(3))
    b = kmeans(x, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.centroids, b.centroids)
    # with N < K every point is its own centroid: zero inertia
    assert a.inertia.item() == pytest.approx(0.0, abs=1e-6)


def test_cosine_kmeans_gives_unit_centroids():
    res = kmeans(torch.randn(100, 5) * 3, 4, metric="cosine")
    torch.testing.assert_close(res.centroids.norm(dim=-1), torch.ones(4))


def test_warm_start_continues_from_given_centroids():
    x, centers = _blobs()
    kept = kmeans(x, 4, kmeans_iters=0, init=centers)
    torch.testing.assert_close(kept.centroids, centers)  # no iterations: the given centroids, assigned
    assert torch.equal(kept.assignments, torch.cdist(x, centers).argmin(-1))
    moved = kmeans(x, 4, kmeans_iters=3, init=centers + 0.5)
    torch.testing.assert_close(moved.centroids, centers, atol=0.05, rtol=0)  # Lloyd steps from the start point
    with pytest.raises(ValueError, match=r"initial centroids must have shape \(4, 2\), got \(3, 2\)"):
        kmeans(x, 4, init=centers[:3])


def test_errors():
    with pytest.raises(ValueError, match="num_clusters must be a positive int, got 0"):
        kmeans(torch.randn(4, 2), 0)
    with pytest.raises(ValueError, match="init must be one of"):
        kmeans(torch.randn(4, 2), 2, init="greedy")
    with pytest.raises(ValueError, match=r"weights must have shape \(4,\)"):
        kmeans(torch.randn(4, 2), 2, weights=torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        kmeans(torch.randn(4, 2), 2, weights=-torch.ones(4))
    with pytest.raises(ValueError, match=r"got \(0, 2\)"):
        kmeans(torch.zeros(0, 2), 2)
    with pytest.raises(TypeError, match=r"kmeans_iters must be an int, got 2.5"):
        kmeans(torch.randn(4, 2), 2, kmeans_iters=2.5)
    with pytest.raises(ValueError, match="kmeans_iters must be a non-negative int, got -1"):
        kmeans(torch.randn(4, 2), 2, kmeans_iters=-1)
    with pytest.raises(TypeError, match="x must be floating point, got dtype torch.int64"):
        kmeans(torch.ones(4, 2, dtype=torch.long), 2)


def test_residual_kmeans_fits_each_codebook_to_what_the_previous_ones_leave():
    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    weights = torch.rand(500, generator=torch.Generator().manual_seed(1))
    fit = residual_kmeans(x, 3, 8, 6, weights, generator=torch.Generator().manual_seed(2))
    assert fit.codebooks.shape == (3, 8, 4) and fit.codes.shape == (500, 3) and fit.codes.dtype == torch.int64
    generator, residual = torch.Generator().manual_seed(2), x
    for m in range(3):  # level by level, the k-means of the residual with the same generator
        level = kmeans(residual, 8, 6, weights, generator=generator)
        assert torch.equal(fit.codebooks[m], level.centroids) and torch.equal(fit.codes[:, m], level.assignments)
        assert torch.equal(level.assignments, torch.cdist(residual, level.centroids).argmin(1))  # nearest entries
        residual = residual - level.centroids[level.assignments]
    decoded = [fit.codebooks[:m][torch.arange(m), fit.codes[:, :m]].sum(1) for m in (1, 2, 3)]
    errors = [(x - d).pow(2).sum().item() for d in decoded]
    assert errors[2] < errors[1] < errors[0]  # every stage codes part of what is left


def test_residual_kmeans_errors():
    with pytest.raises(ValueError, match="num_quantizers must be a positive int, got 0"):
        residual_kmeans(torch.randn(10, 2), 0, 4)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        residual_kmeans([[0.0, 1.0]], 1, 4)
    with pytest.raises(ValueError, match=r"residual_kmeans expects x of shape \(N, D\), got \(2, 10, 2\)"):
        residual_kmeans(torch.randn(2, 10, 2), 1, 4)
