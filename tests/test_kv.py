"""KV caches: the full-precision reference, KIVI, exact bit accounting, append-only behaviour."""

import pytest
import torch
from helpers import tiny_llama

from tokenizers_q.kv import (
    CoupledCodebooks,
    CQConfig,
    CQLayerCache,
    DenseAndSparseLayerCache,
    FullPrecisionLayerCache,
    KIVIConfig,
    KIVILayerCache,
    KVCache,
    PreRoPELayerCache,
    apply_rotary,
    outlier_bounds,
    rotary_tables,
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
    cache = KIVILayerCache(KIVIConfig(key_bits=bits, value_bits=bits, group_size=16, window=16))
    (keys, values), all_keys, all_values = feed(cache, 30)
    assert keys.shape == all_keys.shape == (1, 2, 70, 64)
    window = cache.window_keys.shape[2]
    assert 16 <= window < 32 and cache.quantized_tokens == 70 - window and cache.quantized_tokens % 16 == 0
    assert torch.equal(keys[:, :, -window:], all_keys[:, :, -window:])  # the recent tokens are untouched
    for got, want in ((keys, all_keys), (values, all_values)):
        error = (got - want).norm() / want.norm()
        assert 0 < error < tolerance


def test_kivi_is_append_only():
    cache = KIVILayerCache(KIVIConfig(key_bits=2, value_bits=2, group_size=8, window=8))
    (first_keys, _), _, _ = feed(cache, 0)
    levels, quantized = cache.keys["levels"].codes().clone(), cache.quantized_tokens
    (later_keys, _), _, _ = feed(cache, 0, seed=1)  # 40 more tokens through the same cache
    assert torch.equal(cache.keys["levels"].codes()[:, :, :quantized], levels)
    assert torch.equal(later_keys[:, :, :quantized], first_keys[:, :, :quantized])  # past codes never change


def test_kivi_bits_are_counted_exactly():
    config = KIVIConfig(key_bits=2, value_bits=4, group_size=32, window=32)
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
    cache = KVCache(KIVIConfig(key_bits=8, value_bits=8, group_size=4, window=0).make_layer)
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
    with pytest.raises(ValueError, match=r"keys must be \(batch, heads, tokens, head_dim\), got shape \(2, 1, 64\)"):
        cache.update(torch.randn(2, 1, 64), torch.randn(2, 1, 64))
    with pytest.raises(ValueError, match="key_bits must be an int in \\[1, 8\\], got 9"):
        KIVIConfig(key_bits=9)
    with pytest.raises(ValueError, match="window must be a non-negative int, got -1"):
        KIVIConfig(window=-1)


def test_hugging_face_generation_through_a_library_cache():
    transformers = pytest.importorskip("transformers")
    from tokenizers_q.kv.hf import hf_cache, hf_rotary

    model = tiny_llama()
    config = model.config
    ids = torch.randint(1, 128, (2, 40))
    options = {"max_new_tokens": 12, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    reference = model.generate(ids, past_key_values=transformers.DynamicCache(), **options)
    kivi8 = hf_cache(2, KIVIConfig(key_bits=8, value_bits=8, group_size=16, window=16).make_layer)
    assert torch.equal(model.generate(ids, past_key_values=kivi8, **options), reference)
    assert kivi8.get_seq_length() == 40 + 12 - 1 and kivi8.layers[0].inner.quantized_tokens
    assert 8 < kivi8.bits_per_element() < 32
    rotary = hf_rotary(model)
    cos, sin = rotary(torch.arange(7))
    want_cos, want_sin = rotary_tables(config.head_dim, config.rope_parameters["rope_theta"])(torch.arange(7))
    torch.testing.assert_close((cos, sin), (want_cos, want_sin))
    pre_rope = hf_cache(2, lambda: PreRoPELayerCache(KIVIConfig(8, 8, 16, 16).make_layer(), rotary))
    assert torch.equal(model.generate(ids, past_key_values=pre_rope, **options), reference)
    kivi1 = hf_cache(2, KIVIConfig(key_bits=1, value_bits=1, group_size=16, window=0).make_layer)
    assert not torch.equal(model.generate(ids, past_key_values=kivi1, **options), reference)
    # 51 tokens: 48 in three 1-bit groups (+ 32 bits of scale and offset per 16 elements), 3 in the float32 window
    assert kivi1.bits_per_element() == pytest.approx((48 * (1 + 32 / 16) + 3 * 32) / 51)
    with pytest.raises(ValueError, match="layers must be a positive int or a sequence of LayerCache, got 0"):
        hf_cache(0)
    with pytest.raises(ValueError, match="layers must be a non-empty sequence of LayerCache"):
        hf_cache([object()])


def correlated_kv(tokens: int, seed: int, heads: int = 2, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values whose channels move together (rank 2 per head), as real attention activations do."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(2, heads, 2, dim, generator=torch.Generator().manual_seed(99))
    latent = torch.randn(2, 1, heads, tokens, 2, generator=g)
    keys, values = (latent[i] @ mixing[i] + 0.05 * torch.randn(1, heads, tokens, dim, generator=g) for i in range(2))
    return keys, values


def test_coupled_quantization_beats_per_channel_grids_at_equal_bits():
    config = CQConfig(group_size=4, codebook_size=256)  # 2 bits per channel
    codebooks = CoupledCodebooks.fit(*correlated_kv(2000, seed=0), config)
    assert codebooks.keys.shape == (2, 4, 256, 4) and codebooks.keys.dtype == torch.float16
    keys, values = correlated_kv(64, seed=1)  # held out
    cq = CQLayerCache(codebooks)
    cq_keys, cq_values = cq.update(keys, values)
    kivi = KIVILayerCache(KIVIConfig(key_bits=2, value_bits=2, group_size=16, window=0))
    kivi_keys, kivi_values = kivi.update(keys, values)
    for got_cq, got_kivi, want in ((cq_keys, kivi_keys, keys), (cq_values, kivi_values, values)):
        assert (got_cq - want).norm() < 0.5 * (got_kivi - want).norm()
    assert cq.bits_per_element() == config.bits_per_element() == 2.0  # codes only: the centroids are shared
    counted = CQLayerCache(codebooks, count_codebooks=True)
    counted.update(keys, values)
    assert counted.stored_bits() == cq.stored_bits() + 2 * 2 * 4 * 256 * 4 * 16


def test_coupled_cache_is_append_only_and_checks_heads():
    codebooks = CoupledCodebooks.fit(
        *correlated_kv(300, seed=0), CQConfig(group_size=8, codebook_size=16, kmeans_iters=5)
    )
    cache = CQLayerCache(codebooks)
    keys, values = correlated_kv(10, seed=2)
    first, _ = cache.update(keys, values)
    codes = cache.codes[0].codes().clone()
    later, _ = cache.update(*correlated_kv(5, seed=3))
    assert torch.equal(later[:, :, :10], first) and torch.equal(cache.codes[0].codes()[:, :, :10], codes)
    assert cache.bits_per_element() == (8 * 0.5 + 7 * 1) / 15  # 8 tokens packed, 7 waiting as uint8
    with pytest.raises(ValueError, match="fitted for 2 heads of dim 16, got 3 heads of dim 16"):
        CQLayerCache(codebooks).update(torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16))
    with pytest.raises(ValueError, match="group_size=5 must divide head_dim 16"):
        CoupledCodebooks.fit(*correlated_kv(10, seed=0), CQConfig(group_size=5))


def test_cq_settings_check_their_values_and_read_the_earlier_names():
    with pytest.raises(ValueError, match="codebook_size must be a power of two .* got 100"):
        CQConfig(codebook_size=100)
    with pytest.raises(ValueError, match=r"codebook_size must be an int in \[2, 65536\], got 1"):
        CQConfig(codebook_size=1)
    with pytest.raises(TypeError, match="group_size must be an int, got '4'"):
        CQConfig(group_size="4")
    config = CQConfig(group_size=8, codebook_size=16)
    assert config.code_bits == 4 and config.bits_per_element() == 0.5
    assert CQConfig.from_dict(config.to_dict()) == config
    with pytest.warns(DeprecationWarning, match=r"old codebooks .*\(channels -> group_size, bits -> codebook_size\)"):
        old = CQConfig.from_dict({"channels": 8, "bits": 4, "kmeans_iters": 20, "seed": 0}, "old codebooks")
    assert old == config


def test_fisher_weights_pull_centroids_towards_heavy_vectors():
    keys, values = correlated_kv(400, seed=0)
    weights = torch.ones(1, 2, 400)
    weights[:, :, :40] = 100.0  # the first tokens matter most
    config = CQConfig(group_size=4, codebook_size=4, kmeans_iters=10)
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
    assert torch.equal(cache.tensors()[0][:, :, :32], got_keys)  # append-only
    with pytest.raises(ValueError, match="read head_dim 16, got 8"):
        QuantizerLayerCache(*quantizers).update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    with pytest.raises(ValueError, match="'fsq' has no codebook that k-means calibrates"):
        calibrate_quantizer("fsq", keys.reshape(-1, 16), levels=[8, 8, 8, 8])


def rotated_keys(tokens: int = 96, heads: int = 2, dim: int = 32, seed: int = 0):
    """Pre-RoPE keys with strong per-channel offsets (as real keys have), and the same keys after RoPE."""
    g = torch.Generator().manual_seed(seed)
    offsets = 4 * torch.randn(1, heads, 1, dim, generator=g)
    pre = offsets + 0.3 * torch.randn(1, heads, tokens, dim, generator=g)
    cos, sin = rotary_tables(dim)(torch.arange(tokens))
    return pre, apply_rotary(pre, cos, sin)


def test_pre_rope_cache_stores_unrotated_keys_and_returns_rotated_ones():
    pre, post = rotated_keys()
    values = torch.randn_like(post)
    cache = PreRoPELayerCache(FullPrecisionLayerCache(), rotary_tables(32))
    for start in range(0, 96, 40):  # chunks of 40, 40, 16: positions carry over
        keys, got_values = cache.update(post[:, :, start : start + 40], values[:, :, start : start + 40])
    torch.testing.assert_close(keys, post, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache.inner.keys.tensor(), pre, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_values, values) and cache.bits_per_element() == 32.0


def test_pre_rope_keys_quantize_better_per_channel():
    pre, post = rotated_keys()
    config = KIVIConfig(key_bits=2, value_bits=2, group_size=32, window=0)
    errors = []
    for cache in (config.make_layer(), PreRoPELayerCache(config.make_layer(), rotary_tables(32))):
        keys, _ = cache.update(post, torch.randn_like(post))
        errors.append(((keys - post).norm() / post.norm()).item())
    assert errors[1] < 0.5 * errors[0]


def test_sink_and_outliers_are_kept_exactly_and_counted():
    torch.manual_seed(0)
    keys, values = (torch.distributions.StudentT(2.0).sample((1, 2, 70, 16)) for _ in range(2))
    calibration = torch.distributions.StudentT(2.0).sample((1, 2, 4000, 16))
    bounds = outlier_bounds(calibration, 0.02)
    assert bounds[0].shape == (2, 16) and (bounds[0] < bounds[1]).all()
    inner = KIVIConfig(key_bits=2, value_bits=2, group_size=8, window=0).make_layer()
    cache = DenseAndSparseLayerCache(inner, sink_tokens=3, key_bounds=bounds, value_bounds=bounds)
    for start in (0, 2, 30):  # the sink straddles the first two chunks
        stop = {0: 2, 2: 30, 30: 70}[start]
        got_keys, got_values = cache.update(keys[:, :, start:stop], values[:, :, start:stop])
    assert torch.equal(got_keys[:, :, :3], keys[:, :, :3]) and inner.num_tokens == 67
    lower, upper = (b[None, :, None, :] for b in bounds)
    for got, want in ((got_keys, keys), (got_values, values)):
        outside = (want < lower) | (want > upper)
        outside[:, :, :3] = False
        assert outside.any()
        assert torch.equal(got[outside], want[outside].half().float())
    expected_outliers = sum(((x[:, :, 3:] < lower) | (x[:, :, 3:] > upper)).sum().item() for x in (keys, values))
    assert cache.num_outliers() == expected_outliers
    sink_bits = 2 * 3 * 2 * 16 * 32
    assert cache.stored_bits() == inner.stored_bits() + sink_bits + 48 * expected_outliers
    plain = KIVIConfig(key_bits=2, value_bits=2, group_size=8, window=0).make_layer()
    plain_keys, _ = plain.update(keys, values)
    assert (got_keys - keys).norm() < 0.8 * (plain_keys - keys).norm()


def test_kivi_window_in_float16_is_counted_at_16_bits():
    cache = KIVILayerCache(KIVIConfig(key_bits=2, value_bits=2, group_size=8, window=8, window_dtype=torch.float16))
    (keys, _), all_keys, _ = feed(cache, 0)
    assert keys.dtype == torch.float32 and cache.window_keys.dtype == torch.float16
    window = cache.window_keys.shape[2]
    torch.testing.assert_close(keys[:, :, -window:], all_keys[:, :, -window:], atol=2e-3, rtol=1e-3)
    groups = (40 - window) * 2 * 64 * 2  # quantized elements
    metadata = 2 * (2 * 64 * (40 - window) // 8) * 2 * 16  # scale + offset per 8 elements, keys and values
    assert cache.stored_bits() == groups * 2 + metadata + 2 * 2 * 64 * window * 16


def test_sparse_and_rope_errors():
    inner = FullPrecisionLayerCache()
    with pytest.raises(TypeError, match="inner must be a LayerCache"):
        DenseAndSparseLayerCache(object())
    with pytest.raises(ValueError, match="sink_tokens must be a non-negative int, got -1"):
        DenseAndSparseLayerCache(inner, sink_tokens=-1)
    with pytest.raises(ValueError, match="fraction must be in"):
        outlier_bounds(torch.randn(1, 2, 10, 4), 1.5)
    bounds = outlier_bounds(torch.randn(1, 3, 50, 4), 0.1)
    with pytest.raises(ValueError, match="bounds are for 3 heads of dim 4"):
        DenseAndSparseLayerCache(inner, 0, bounds).update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="head_dim must be a positive even int, got 5"):
        rotary_tables(5)
    with pytest.raises(TypeError, match="rotary must map positions"):
        PreRoPELayerCache(inner, None)
    with pytest.raises(ValueError, match="rotary gave tables of shape"):
        PreRoPELayerCache(inner, rotary_tables(8)).update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="window_dtype must be a floating torch dtype"):
        KIVIConfig(window_dtype=torch.int8)


def test_token_buffers_grow_by_pages_and_packed_tokens_round_trip(monkeypatch):
    import tokenizers_q.kv.buffer as buffer
    from tokenizers_q.packing import TokenSpec

    monkeypatch.setattr(buffer, "GROWTH", 1 / 8)
    tokens = buffer.TokenBuffer()
    parts = [torch.randn(1, 2, n, 3) for n in (40, *[1] * 30)]
    pointers = set()
    for part in parts:
        tokens.append(part)
        pointers.add(tokens.storage.data_ptr())
    assert torch.equal(tokens.tensor(), torch.cat(parts, 2)) and tokens.storage.shape[2] <= 70 * 9 / 8
    assert len(pointers) <= 6  # moved 5 times for 30 appends, not once per append
    with pytest.raises(ValueError, match="cannot append torch.float64 .* to a buffer of torch.float32"):
        tokens.append(torch.randn(1, 2, 1, 3, dtype=torch.float64))
    for spec, width in [(TokenSpec((4,)), 64), (TokenSpec((1024, 16)), 2), (TokenSpec((64,)), 1)]:
        packed = buffer.PackedTokens(spec, width)
        sizes = torch.tensor(spec.codebook_sizes * (width // spec.num_codebooks))
        chunks = [(torch.rand(2, 3, n, width) * sizes).long() for n in (5, 1, 17, 8)]
        for chunk in chunks:
            packed.append(chunk)
        assert torch.equal(packed.codes(), torch.cat(chunks, 2)) and packed.length == 31
        assert packed.tail.shape[2] == 31 % 8
        whole = 2 * 3 * 24 * width * sum(spec.bits) // spec.num_codebooks  # 24 tokens packed at their width
        assert packed.stored_bits() == whole + packed.tail.numel() * packed.tail.element_size() * 8


def kv_caches():
    """Every cache kind at head_dim 64, 2 heads, fp16 keys and values: (name, cache, shared objects)."""
    from tokenizers_q.kv import QuantizerLayerCache, calibrate_quantizer

    keys, values = correlated_kv(600, seed=0, dim=64)
    vq = [calibrate_quantizer("vq", x.reshape(-1, 64), passes=1, codebook_size=256) for x in (keys, values)]
    cq = CoupledCodebooks.fit(keys, values, CQConfig(group_size=4, codebook_size=256, kmeans_iters=3))
    bounds = [outlier_bounds(x, 0.01) for x in (keys, values)]
    kivi = KIVIConfig(2, 2, group_size=32, window=32, window_dtype=torch.float16)
    return [
        ("fp16", FullPrecisionLayerCache(), []),
        ("kivi-2", kivi.make_layer(), []),
        ("kivi-4", KIVIConfig(4, 4, window=32).make_layer(), []),
        ("cq-2", CQLayerCache(cq), [cq]),
        ("vq-256", QuantizerLayerCache(*vq), vq),
        ("kivi-2 + sink + outliers", DenseAndSparseLayerCache(kivi.make_layer(), 4, *bounds), []),
        ("pre-rope kivi-2", PreRoPELayerCache(kivi.make_layer(), rotary_tables(64)), []),
    ]


@pytest.mark.parametrize("index", range(7), ids=[name for name, _, _ in kv_caches()])
def test_every_cache_holds_what_it_counts(index):
    from tokenizers_q.memory import held_bytes

    name, cache, shared = kv_caches()[index]
    keys, values = correlated_kv(1100, seed=1, dim=64)
    keys, values = keys.half(), values.half()
    out = cache.update(keys[:, :, :1000], values[:, :, :1000])
    for t in range(1000, 1100):  # decode steps
        out = cache.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    assert out[0].shape == (1, 2, 1100, 64) and out[0].dtype == torch.float16
    del out
    seen = set()
    for obj in shared:  # shared by every sequence (and not counted unless asked): not this cache's bytes
        held_bytes(obj, seen)
    held, counted = held_bytes(cache, seen), cache.stored_bits() / 8
    assert counted <= held <= 1.05 * counted + 4096, (name, held, counted)


def reference_attention(cache, queries, mask=None):
    """softmax(q k^T / sqrt(d) + mask) v over the cache's tensors, heads repeated as repeat_kv does."""
    keys, values = cache.tensors(torch.float32)
    repeat = queries.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(repeat, 1), values.repeat_interleave(repeat, 1)
    scores = queries.float() @ keys.transpose(-1, -2) / keys.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ values


def attention_caches():
    """Every kind of kv_caches, plus RVQ and PQ quantizer caches; names of the kinds that attend from codes."""
    from tokenizers_q.kv import QuantizerLayerCache, calibrate_quantizer

    keys, values = correlated_kv(600, seed=0, dim=64)
    extra = []
    options = {"rvq": {"num_quantizers": 2, "codebook_size": 64}, "pq": {"num_groups": 4, "codebook_size": 64}}
    for name, kwargs in options.items():
        quantizers = [calibrate_quantizer(name, x.reshape(-1, 64), passes=1, **kwargs) for x in (keys, values)]
        extra.append((name, QuantizerLayerCache(*quantizers), quantizers))
    return [*kv_caches(), *extra]


FROM_CODES = {"kivi-2", "kivi-4", "cq-2", "vq-256", "rvq", "pq"}


@pytest.mark.parametrize("path", ["loops", "torch ops"])
@pytest.mark.parametrize("index", range(9), ids=[name for name, _, _ in attention_caches()])
def test_attention_from_codes_equals_attention_over_the_dequantized_tensors(index, path, monkeypatch):
    from tokenizers_q.kv import loops

    name, cache, _ = attention_caches()[index]
    if path == "torch ops":  # without the C++ loops (no compiler): gathers and products in eager torch
        monkeypatch.setitem(loops._BUILT, "module", None)
        monkeypatch.setattr(KIVILayerCache, "fused_attention", False)
    keys, values = correlated_kv(300, seed=1, dim=64)
    cache.append(keys[:, :, :299], values[:, :, :299])
    g = torch.Generator().manual_seed(2)
    queries = torch.randn(1, 6, 1, 64, generator=g)  # a decode step, 3 query heads per key/value head
    expected = reference_attention(cache, queries)
    mask = torch.rand(1, 6, 1, 299, generator=g) > 0.3  # some tokens hidden from some heads
    expected_masked = reference_attention(cache, queries, mask)
    with monkeypatch.context() as patch:
        if name in FROM_CODES:  # the codes are read, never the dequantized tensors
            patch.setattr(cache, "tensors", lambda *a: pytest.fail(f"{name} made its tensors to attend"))
        torch.testing.assert_close(cache.attend(queries), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache.attend(queries, mask=mask), expected_masked, rtol=1e-4, atol=1e-5)
    cache.append(keys[:, :, 299:], values[:, :, 299:])
    prefill = torch.randn(1, 2, 40, 64, generator=g)  # many queries, causal: through the tensors
    causal = torch.ones(40, 300, dtype=torch.bool).tril(260)
    torch.testing.assert_close(
        cache.attend(prefill, scale=0.1, mask=causal),
        reference_attention(cache, prefill * 0.1 * 64**0.5, causal),
        rtol=1e-4,
        atol=1e-5,
    )
    four_heads = FullPrecisionLayerCache()
    four_heads.append(torch.randn(1, 4, 3, 64), torch.randn(1, 4, 3, 64))
    with pytest.raises(ValueError, match="6 query heads cannot share 4 key/value heads evenly"):
        four_heads.attend(queries)
    with pytest.raises(ValueError, match="the cache is empty: append keys and values before attending"):
        FullPrecisionLayerCache().attend(queries)


def test_hugging_face_models_attend_from_the_codes():
    pytest.importorskip("transformers")
    from tokenizers_q.kv.hf import hf_cache, use_code_attention

    model = tiny_llama()
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    options = {"max_new_tokens": 12, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    config = KIVIConfig(key_bits=8, value_bits=8, group_size=16, window=16)
    through_tensors = model.generate(ids, past_key_values=hf_cache(2, config.make_layer), **options)
    codes_cache = hf_cache(2, config.make_layer, attend_from_codes=True)
    with pytest.raises(TypeError, match="got the codes of a KV cache made with attend_from_codes=True"):
        model.generate(ids, past_key_values=codes_cache, **options)  # sdpa cannot read codes
    use_code_attention(model)
    codes_cache = hf_cache(2, config.make_layer, attend_from_codes=True)
    assert torch.equal(model.generate(ids, past_key_values=codes_cache, **options), through_tensors)
    assert codes_cache.layers[0].inner.quantized_tokens == 32  # the decode steps read 32 coded tokens
    # a plain cache under the same attention function: sdpa, as before
    assert torch.equal(model.generate(ids, past_key_values=hf_cache(2, config.make_layer), **options), through_tensors)


def test_calibrations_save_and_load_as_caches_that_store_the_same_codes(tmp_path):
    from tokenizers_q.kv import (
        LayerCalibration,
        QuantizerLayerCache,
        calibrate_quantizer,
        load_calibration,
        save_calibration,
    )

    keys, values = correlated_kv(400, seed=0)
    calibration = LayerCalibration(
        CoupledCodebooks.fit(keys, values, CQConfig(group_size=4, codebook_size=64, kmeans_iters=3)),
        tuple(
            calibrate_quantizer("rvq", x.reshape(-1, 16), 1, num_quantizers=2, codebook_size=32) for x in (keys, values)
        ),
        outlier_bounds(keys, 0.02),
        outlier_bounds(values, 0.02),
    )
    path = save_calibration(tmp_path / "smollm2.kv.safetensors", [calibration, calibration])
    loaded = load_calibration(path, num_layers=2, heads=2, head_dim=16)
    held_keys, held_values = correlated_kv(40, seed=1)

    def caches(layer):
        return [
            CQLayerCache(layer.codebooks),
            DenseAndSparseLayerCache(QuantizerLayerCache(*layer.quantizers), 1, layer.key_bounds, layer.value_bounds),
        ]

    for original, restored in zip(caches(calibration), caches(loaded[1])):
        for got, want in zip(restored.update(held_keys, held_values), original.update(held_keys, held_values)):
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="calibrates 2 attention layers, but the model has 30"):
        load_calibration(path, num_layers=30)
    with pytest.raises(
        ValueError, match=r"for layer 0 with \{'heads': 2, 'head_dim': 16\}, but the model has \{'heads': 3"
    ):
        load_calibration(path, heads=3, head_dim=64)
    with pytest.raises(ValueError, match="has no construction arguments to save: build it with create_quantizer"):
        from tokenizers_q.quantizers import VQ

        save_calibration(tmp_path / "bad.safetensors", [LayerCalibration(quantizers=(VQ(16, 8), VQ(16, 8)))])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_compiled_kivi_attention_equals_attention_over_the_dequantized_tensors(bits, monkeypatch):
    from tokenizers_q.kv import loops

    monkeypatch.setitem(loops._BUILT, "module", None)  # off the CPU loops' path: torch.compile
    cache = KIVILayerCache(KIVIConfig(bits, bits, group_size=32, window=32, window_dtype=torch.float16))
    keys, values = correlated_kv(300, seed=1, dim=64)
    g = torch.Generator().manual_seed(2)
    for count in (200, 1, 40):  # the token count changes between calls: one graph serves them
        cache.append(keys[:, :, :count], values[:, :, :count])
        queries = torch.randn(1, 6, 1, 64, generator=g)
        mask = torch.rand(1, 6, 1, cache.num_tokens, generator=g) > 0.3
        for m in (None, mask):
            torch.testing.assert_close(
                cache.attend(queries, mask=m), reference_attention(cache, queries, m), rtol=1e-4, atol=1e-5
            )
    assert cache.quantized_tokens % 32 == 0 and cache._whole_bytes()
    from tokenizers_q.kv import kivi

    assert kivi._COMPILED.failed is None and kivi._coded_scores in kivi._COMPILED.functions
