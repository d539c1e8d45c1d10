"""KV caches over keys and values rotated per head: same attention, less error where channels are outliers."""

import pytest
import torch

from tokenizers_q.kv import (
    CoupledCodebooks,
    CQConfig,
    CQLayerCache,
    FullPrecisionLayerCache,
    KIVIConfig,
    KIVILayerCache,
)
from tokenizers_q.kv.rotated import RotatedLayerCache


def outlier_kv(tokens: int, seed: int, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(2, 1, 2, tokens, dim, generator=g)
    keys[..., 5] *= 30  # an outlier channel, as language models' keys have
    values[..., 7] *= 10
    return keys, values


@pytest.mark.parametrize("sides", [(True, True), (True, False), (False, True)])
def test_a_rotated_full_precision_cache_gives_back_its_tensors_and_attention(sides):
    keys, values = outlier_kv(20, seed=0)
    cache, plain = RotatedLayerCache(FullPrecisionLayerCache(), 64, 1, *sides), FullPrecisionLayerCache()
    for c in (cache, plain):
        c.append(keys, values)
    for got, want in zip(cache.tensors(torch.float32), (keys, values)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    queries = torch.randn(1, 4, 3, 64)
    torch.testing.assert_close(cache.attend(queries), plain.attend(queries), rtol=1e-4, atol=1e-4)
    assert cache.stored_bits() == cache.inner.stored_bits()


@pytest.mark.parametrize("value_bits, gain", [(2, 0.7), (4, 0.7)])
def test_rotated_values_quantize_per_token_with_less_error(value_bits, gain):
    """Per-token value grids: an outlier channel sets the scale of its whole group until rotated away (measured
    0.55 -> 0.34 relative error at 2 bits, 0.10 -> 0.07 at 4); keys per channel are left as they are."""
    keys, values = outlier_kv(256, seed=1)
    config = KIVIConfig(key_bits=value_bits, value_bits=value_bits, group_size=32, window=0)
    plain, rotated = KIVILayerCache(config), RotatedLayerCache(KIVILayerCache(config), 64, rotate_keys=False)
    for cache in (plain, rotated):
        cache.append(keys, values)
    (plain_keys, plain_values), (rotated_keys, rotated_values) = plain.tensors(), rotated.tensors()
    assert torch.equal(rotated_keys, plain_keys)
    assert (rotated_values - values).norm() < gain * (plain_values - values).norm()
    assert rotated.stored_bits() == plain.stored_bits()  # the rotation stores nothing


def test_rotated_codebooks_attend_from_their_codes():
    keys, values = outlier_kv(128, seed=1)
    rotation = RotatedLayerCache(FullPrecisionLayerCache(), 64).rotation
    calibration = [rotation.rotate(x) for x in outlier_kv(256, seed=2)]
    books = CoupledCodebooks.fit(*calibration, CQConfig(group_size=4, codebook_size=16, kmeans_iters=3))
    cache = RotatedLayerCache(CQLayerCache(books), 64)
    cache.append(keys, values)
    queries = torch.randn(1, 2, 1, 64)
    expected_keys, expected_values = cache.tensors(torch.float32)
    scores = torch.softmax(queries @ expected_keys.transpose(-1, -2) / 8, -1)
    torch.testing.assert_close(cache.attend(queries), scores @ expected_values, rtol=1e-4, atol=1e-4)


def test_rotated_cache_refuses_what_is_not_a_cache():
    with pytest.raises(TypeError, match="inner must be a LayerCache, got int"):
        RotatedLayerCache(3, 64)
    with pytest.raises(ValueError, match="rotates its keys, its values or both"):
        RotatedLayerCache(FullPrecisionLayerCache(), 64, rotate_keys=False, rotate_values=False)
