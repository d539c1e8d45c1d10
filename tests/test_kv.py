"""KV caches: the full-precision reference, KIVI, exact bit accounting, append-only behaviour."""

import pytest
import torch

from tokenizers_q.kv import FullPrecisionLayerCache, KIVIConfig, KIVILayerCache, KVCache


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
