"""Non-uniform KV levels: calibrated per-channel keys and per-token values, counted exactly."""

import pytest
import torch

from tokenizers_q.kv import KIVIConfig, KIVILayerCache
from tokenizers_q.kv.nuq import NUQConfig, NUQLayerCache, NUQLevels
from tokenizers_q.memory import held_bytes


def skewed_kv(tokens: int, seed: int, heads: int = 2, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with channels of very different ranges and heavy-tailed values, as attention layers have."""
    channel_scale = torch.logspace(-1, 1, dim)[torch.randperm(dim, generator=torch.Generator().manual_seed(0))]
    g = torch.Generator().manual_seed(seed)  # the same channels in every sample, other tokens
    keys = torch.randn(1, heads, tokens, dim, generator=g) * channel_scale + 0.5
    values = torch.distributions.StudentT(3.0).sample((1, heads, tokens, dim))
    return keys, values


def relative_errors(cache, keys, values):
    cache.append(keys, values)
    got_keys, got_values = cache.tensors(torch.float32)
    return ((got_keys - keys).norm() / keys.norm()).item(), ((got_values - values).norm() / values.norm()).item()


def test_more_bits_less_error_and_better_than_uniform_grids_at_equal_bits():
    torch.manual_seed(0)
    calibration, held_out = skewed_kv(512, seed=0), skewed_kv(256, seed=1)
    errors = {}
    for bits in (2, 3, 4):
        levels = NUQLevels.fit(*calibration, NUQConfig(bits, bits, kmeans_iters=10))
        errors[bits] = relative_errors(NUQLayerCache(levels), *held_out)
    assert errors[4] < errors[3] < errors[2]
    kivi = KIVILayerCache(KIVIConfig(key_bits=2, value_bits=2, group_size=32, window=0))  # 3 bits with scales
    kivi_errors = relative_errors(kivi, *held_out)
    assert errors[3][0] < kivi_errors[0] and errors[3][1] < kivi_errors[1]  # 3 / 3.25 bits against 3 / 3


def test_bits_are_the_codes_and_one_value_scale_per_token():
    levels = NUQLevels.fit(*skewed_kv(128, seed=0), NUQConfig(2, 3, kmeans_iters=5))
    cache = NUQLayerCache(levels)
    keys, values = skewed_kv(256, seed=2)
    cache.append(keys, values)
    assert cache.bits_per_element() == (2 + 3 + 16 / 64) / 2
    counted = NUQLayerCache(levels, count_codebooks=True)
    counted.append(keys, values)
    assert counted.stored_bits() == cache.stored_bits() + 16 * (2 * 2 * 64 + 4 + 8)
    assert 8 * held_bytes(cache, {id(levels)}) <= 1.05 * cache.stored_bits() + 8 * 4096


def test_fisher_weights_pull_the_levels_towards_the_heavy_vectors():
    keys, values = skewed_kv(400, seed=0)
    weights = torch.ones(1, 2, 400)
    weights[:, :, :40] = 100.0
    config = NUQConfig(2, 2, kmeans_iters=10)
    plain, weighted = NUQLevels.fit(keys, values, config), NUQLevels.fit(keys, values, config, weights, weights)
    heavy = keys[:, :, :40], values[:, :, :40]
    plain_error = relative_errors(NUQLayerCache(plain), *heavy)
    weighted_error = relative_errors(NUQLayerCache(weighted), *heavy)
    assert sum(weighted_error) < sum(plain_error)


def test_bad_shapes_and_settings_are_refused():
    levels = NUQLevels.fit(*skewed_kv(64, seed=0), NUQConfig(2, 2, kmeans_iters=2))
    with pytest.raises(ValueError, match="fitted for 2 heads of dim 64, got 3 heads of dim 64"):
        NUQLayerCache(levels).append(torch.randn(1, 3, 4, 64), torch.randn(1, 3, 4, 64))
    with pytest.raises(ValueError, match=r"key_bits must be an int in \[1, 8\], got 9"):
        NUQConfig(key_bits=9)
    with pytest.raises(ValueError, match="levels must number 2\\^key_bits"):
        NUQLevels(levels.key_center, levels.key_scale, levels.key_levels, levels.value_levels, NUQConfig(3, 2))
