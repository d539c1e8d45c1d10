"""Sample-quality metrics: the Fréchet distance and the shipped feature classifier."""

from pathlib import Path

import pytest
import torch

from tokenizers_q.metrics import frechet_distance
from tokenizers_q.models.feature_classifier import FeatureClassifier


def whitened(n: int, d: int) -> torch.Tensor:
    """n samples with mean exactly 0 and sample covariance exactly the identity."""
    x = torch.randn(n, d, dtype=torch.float64)
    x = x - x.mean(0)
    return x @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(x.T))).T


def test_frechet_distance_closed_forms():
    x = whitened(300, 8)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    shift = torch.arange(8, dtype=torch.float64)
    assert frechet_distance(x, x + shift) == pytest.approx(shift.square().sum().item())
    # diagonal covariances: sum of (sigma_a - sigma_b)^2
    scale = torch.linspace(0.5, 3.0, 8, dtype=torch.float64)
    assert frechet_distance(x, x * scale) == pytest.approx((1 - scale).square().sum().item())
    # invariant to a common rotation
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    assert frechet_distance(x @ q, (x * scale + shift) @ q) == pytest.approx(frechet_distance(x, x * scale + shift))


def test_frechet_distance_errors():
    with pytest.raises(ValueError, match=r"expected \(N, D\) and \(M, D\) features"):
        frechet_distance(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="at least 2 rows"):
        frechet_distance(torch.randn(1, 3), torch.randn(5, 3))


def test_feature_classifier_ships_with_the_library():
    model = FeatureClassifier.pretrained()
    x = torch.rand(4, 1, 32, 32)
    features = model.features(x)
    assert features.shape == (4, 128) and torch.equal(features, model.features(x))
    assert not model.training and model(x).shape == (4, 10)
    with pytest.raises(ValueError, match=r"expected grey 32x32 images"):
        model.features(torch.rand(4, 3, 32, 32))


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_feature_classifier_classifies_fashion_mnist():
    from tokenizers_q.trainers.data import ImageDataModule

    data = ImageDataModule(batch_size=500)
    x, y = next(iter(data.dataloader("test")))
    with torch.no_grad():
        accuracy = (FeatureClassifier.pretrained()(x).argmax(1) == y).float().mean()
    assert accuracy > 0.85
