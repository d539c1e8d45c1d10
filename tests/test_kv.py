"""KV caches: the full-precision reference, KIVI, exact bit accounting, append-only behaviour."""

import pytest
import torch

from tokenizers_q.kv import (
    CoupledCodebooks,
    CQConfig,
    CQLayerCache,
    FullPrecisionLayerCache,
    KIVIConfig,
    KIVILayerCache,
    KVCache,
)


def feed(cache, steps, batch=1, heads=2, dim=64, dtype=torch.float32, seed=0):
    """Prefill of 40 tokens, then ``steps`` single tokens; returns the last (keys, values) and all inputs."""
    g = torch.Generator().manual_seed(seed)
    inputs = [
        tuple(torch.randn(batch, heads, n, dim, generator=g).to(dtype) for _ in range(2)) for n in [40] + [1] * steps
    ]
    out = None
    for keys, values in inputs:
        out = cache.update(keys, values)
    return out, torch.cat([k for k, _ in inputs], 2), torch.cat([v for _, v in inputs], 2)


def test_full_precision_cache_returns_everything_and_counts_its_dtype():
    cache = FullPrecisionLayerCache()
    (keys, values), all_keys, all_values = feed(cache, 5, dtype=torch.bfloat16)
    assert torch.equal(keys, all_keys) and torch.equal(values, all_values)
    assert cache.num_tokens == 45 and cache.bits_per_element() == 16.0


@pytest.mark.parametrize("bits, tolerance", [(8, 0.01), (4, 0.12), (2, 0.5)])
def test_kivi_error_shrinks_with_bits_and_the_window_is_exact(bits, tolerance):
    cache = KIVILayerCache(KIVIConfig(key_bits=bits, value_bits=bits, group_size=16, residual=16))
    (keys, values), all_keys, all_values = feed(cache, 30)
    assert keys.shape == all_keys.shape == (1, 2, 70, 64)
    window = cache.window_keys.shape[2]
    assert 16 <= window < 32 and len(cache.key_groups) == (70 - window) // 16
    assert torch.equal(keys[:, :, -window:], all_keys[:, :, -window:])  # the recent tokens are untouched
    for got, want in ((keys, all_keys), (values, all_values)):
        error = (got - want).norm() / want.norm()
        assert 0 < error < tolerance


def test_kivi_is_append_only():
    cache = KIVILayerCache(KIVIConfig(key_bits=2, value_bits=2, group_size=8, residual=8))
    (first_keys, _), _, _ = feed(cache, 0)
    levels = [g.levels.clone() for g in cache.key_groups]
    quantized = len(cache.key_groups) * 8
    (later_keys, _), _, _ = feed(cache, 0, seed=1)  # 40 more tokens through the same cache
    assert all(torch.equal(a, g.levels) for a, g in zip(levels, cache.key_groups))
    assert torch.equal(later_keys[:, :, :quantized], first_keys[:, :, :quantized])  # past codes never change


def test_kivi_bits_are_counted_exactly():
    config = KIVIConfig(key_bits=2, value_bits=4, group_size=32, residual=32)
    cache = KIVILayerCache(config)
    g = torch.Generator().manual_seed(0)
    cache.update(torch.randn(1, 2, 100, 64, generator=g), torch.randn(1, 2, 100, 64, generator=g))
    # 100 tokens: two groups of 32 quantized (64 tokens), 36 in the float32 window
    keys = 2 * 64 * 64 * 2 + 2 * 2 * 64 * 2 * 16  # levels + (scale, offset) per head, group and channel
    values = 2 * 64 * 64 * 4 + 2 * 64 * 2 * 2 * 16  # levels + (scale, offset) per head, token and channel group
    window = 2 * 2 * 36 * 64 * 32
    assert cache.stored_bits() == keys + values + window
    assert cache.bits_per_element() == (keys + values + window) / (2 * 2 * 100 * 64)


def test_kv_cache_makes_layers_on_demand_and_totals_bits():
    cache = KVCache(KIVIConfig(key_bits=8, value_bits=8, group_size=4, residual=0).make_layer)
    for layer in range(3):
        cache[layer].update(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4))
    assert len(cache) == 3 and cache.num_tokens == 8
    assert cache.bits_per_element() == pytest.approx(8 + 32 / 4)  # keys: per 4 tokens; values: per 4 channels
    assert KVCache().bits_per_element() == 0.0


def test_bad_input_is_reported():
    cache = KIVILayerCache(KIVIConfig())
    cache.update(torch.randn(1, 2, 3, 64), torch.randn(1, 2, 3, 64))
    with pytest.raises(ValueError, match=r"holds \(batch, heads, head_dim\) = \(1, 2, 64\), got \(1, 2, 32\)"):
        cache.update(torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32))
    with pytest.raises(ValueError, match="holds torch.float32 keys and values, got torch.bfloat16"):
        cache.update(torch.randn(1, 2, 1, 64, dtype=torch.bfloat16), torch.randn(1, 2, 1, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="must have the same shape"):
        cache.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 2, 64))
    with pytest.raises(ValueError, match=r"float tensor \(batch, heads, tokens, head_dim\)"):
        cache.update(torch.randn(2, 1, 64), torch.randn(2, 1, 64))
    with pytest.raises(ValueError, match="key_bits must be an int in \\[1, 8\\], got 9"):
        KIVIConfig(key_bits=9)
    with pytest.raises(ValueError, match="residual must be a non-negative int"):
        KIVIConfig(residual=-1)


def test_hugging_face_generation_through_a_library_cache():
    transformers = pytest.importorskip("transformers")
    from tokenizers_q.kv.hf import hf_cache

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 128, (2, 40))
    options = {"max_new_tokens": 12, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    reference = model.generate(ids, past_key_values=transformers.DynamicCache(), **options)
    kivi8 = hf_cache(2, KIVIConfig(key_bits=8, value_bits=8, group_size=16, residual=16).make_layer)
    assert torch.equal(model.generate(ids, past_key_values=kivi8, **options), reference)
    assert kivi8.get_seq_length() == 40 + 12 - 1 and kivi8.layers[0].inner.key_groups
    assert 8 < kivi8.bits_per_element() < 32
    kivi1 = hf_cache(2, KIVIConfig(key_bits=1, value_bits=1, group_size=16, residual=0).make_layer)
    assert not torch.equal(model.generate(ids, past_key_values=kivi1, **options), reference)
    # 51 tokens: 48 in three 1-bit groups (+ 32 bits of scale and offset per 16 elements), 3 in the float32 window
    assert kivi1.bits_per_element() == pytest.approx((48 * (1 + 32 / 16) + 3 * 32) / 51)
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        hf_cache(0)


def correlated_kv(tokens: int, seed: int, heads: int = 2, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values whose channels move together (rank 2 per head), as real attention activations do."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(2, heads, 2, dim, generator=torch.Generator().manual_seed(99))
    latent = torch.randn(2, 1, heads, tokens, 2, generator=g)
    keys, values = (latent[i] @ mixing[i] + 0.05 * torch.randn(1, heads, tokens, dim, generator=g) for i in range(2))
    return keys, values


def test_coupled_quantization_beats_per_channel_grids_at_equal_bits():
    config = CQConfig(channels=4, bits=8)  # 2 bits per channel
    codebooks = CoupledCodebooks.fit(*correlated_kv(2000, seed=0), config)
    assert codebooks.keys.shape == (2, 4, 256, 4) and codebooks.keys.dtype == torch.float16
    keys, values = correlated_kv(64, seed=1)  # held out
    cq = CQLayerCache(codebooks)
    cq_keys, cq_values = cq.update(keys, values)
    kivi = KIVILayerCache(KIVIConfig(key_bits=2, value_bits=2, group_size=16, residual=0))
    kivi_keys, kivi_values = kivi.update(keys, values)
    for got_cq, got_kivi, want in ((cq_keys, kivi_keys, keys), (cq_values, kivi_values, values)):
        assert (got_cq - want).norm() < 0.5 * (got_kivi - want).norm()
    assert cq.bits_per_element() == config.bits_per_channel == 2.0  # codes only: the centroids are shared
    counted = CQLayerCache(codebooks, count_codebooks=True)
    counted.update(keys, values)
    assert counted.stored_bits() == cq.stored_bits() + 2 * 2 * 4 * 256 * 4 * 16


def test_coupled_cache_is_append_only_and_checks_heads():
    codebooks = CoupledCodebooks.fit(*correlated_kv(300, seed=0), CQConfig(channels=8, bits=4, num_iters=5))
    cache = CQLayerCache(codebooks)
    keys, values = correlated_kv(10, seed=2)
    first, _ = cache.update(keys, values)
    codes = cache.codes[0][0].clone()
    later, _ = cache.update(*correlated_kv(5, seed=3))
    assert torch.equal(later[:, :, :10], first) and torch.equal(cache.codes[0][0], codes)
    assert cache.bits_per_element() == 0.5
    with pytest.raises(ValueError, match="fitted for 2 heads of dim 16, got 3 heads of dim 16"):
        CQLayerCache(codebooks).update(torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16))
    with pytest.raises(ValueError, match="channels=5 must divide head_dim 16"):
        CoupledCodebooks.fit(*correlated_kv(10, seed=0), CQConfig(channels=5))


def test_fisher_weights_pull_centroids_towards_heavy_vectors():
    keys, values = correlated_kv(400, seed=0)
    weights = torch.ones(1, 2, 400)
    weights[:, :, :40] = 100.0  # the first tokens matter most
    config = CQConfig(channels=4, bits=2, num_iters=10)
    plain = CQLayerCache(CoupledCodebooks.fit(keys, values, config))
    weighted = CQLayerCache(CoupledCodebooks.fit(keys, values, config, weights, weights))
    heavy = keys[:, :, :40]
    error_plain = (plain.update(heavy, values[:, :, :40])[0] - heavy).norm()
    error_weighted = (weighted.update(heavy, values[:, :, :40])[0] - heavy).norm()
    assert error_weighted < error_plain


@pytest.mark.parametrize(
    "name, kwargs, bits",
    [
        ("vq", {"codebook_size": 256}, 8),
        ("rvq", {"num_quantizers": 2, "codebook_size": 256}, 16),
        ("pq", {"num_groups": 4, "codebook_size": 256}, 32),
    ],
)
def test_library_quantizers_as_kv_caches(name, kwargs, bits):
    from tokenizers_q.kv import QuantizerLayerCache, calibrate_quantizer

    keys, values = correlated_kv(1000, seed=0)
    quantizers = [calibrate_quantizer(name, x.reshape(-1, 16), **kwargs) for x in (keys, values)]
    cache = QuantizerLayerCache(*quantizers)
    held_keys, held_values = correlated_kv(32, seed=1)
    got_keys, got_values = cache.update(held_keys, held_values)
    assert got_keys.shape == held_keys.shape
    relative = (got_keys - held_keys).norm() / held_keys.norm()
    assert relative < 0.6  # a rank-2 signal: the calibrated codes keep most of it
    assert cache.bits_per_element() == bits / 16  # codes of one head vector over its 16 elements
    cache.update(*correlated_kv(4, seed=2))
    assert torch.equal(cache.past[0][:, :, :32], got_keys)  # append-only
    with pytest.raises(ValueError, match="read head_dim 16, got 8"):
        QuantizerLayerCache(*quantizers).update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    with pytest.raises(ValueError, match="'fsq' has no codebook that k-means calibrates"):
        calibrate_quantizer("fsq", keys.reshape(-1, 16), levels=[8, 8, 8, 8])
