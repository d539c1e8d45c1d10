"""Bad numerical input raises a clear error naming the tensor and the count; degenerate input is handled."""

import pytest
import torch
from conftest import CONFIGS, VARIANTS
from torch import nn

from tokenizers_q import Codebook, create_quantizer, kmeans, list_quantizers, nearest
from tokenizers_q.checks import check_finite, max_magnitude
from tokenizers_q.embeddings.codec import EmbeddingCodec
from tokenizers_q.kv import (
    CoupledCodebooks,
    CQConfig,
    CQLayerCache,
    DenseAndSparseLayerCache,
    FullPrecisionLayerCache,
    KIVIConfig,
    PreRoPELayerCache,
    QuantizerLayerCache,
    calibrate_quantizer,
    outlier_bounds,
    rotary_tables,
)
from tokenizers_q.weights import IntGridConfig, KMeansConfig, quantize_

NON_FINITE = [float("nan"), float("inf"), float("-inf")]


def with_bad(x: torch.Tensor, value: float, *index) -> torch.Tensor:
    x = x.clone()
    x[index] = value
    return x


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], module: nn.Module) -> None:
    after = module.state_dict()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, equal_nan=True, msg=f"{name} changed")


# -- the shared helper -------------------------------------------------------------------------------


def test_check_finite_counts_only_bad_entries_and_passes_integers_and_empty():
    x = torch.randn(3, 5)
    check_finite(x, "x")
    check_finite(torch.empty(0, 4).fill_(float("nan")), "x")
    check_finite(torch.arange(4), "x")
    whole = r"^x holds 3 non-finite values \(NaN or inf\) of 15; clean or drop those rows$"
    with pytest.raises(ValueError, match=whole):
        check_finite(with_bad(with_bad(x, float("nan"), 0, 1), float("inf"), slice(1, 3), 2), "x")
    with pytest.raises(ValueError, match=r"x holds 1 non-finite value \(NaN or inf\) of 15; do this"):
        check_finite(with_bad(x, float("-inf"), 2, 4).bfloat16(), "x", hint="do this")
    with pytest.raises(ValueError, match=r"x magnitude is too large: values up to 1e\+30; above 2.31e\+18 squared"):
        check_finite(with_bad(x, -1e30, 1, 1), "x", max_magnitude(16))


# -- 1, 2: k-means and nearest-code search -----------------------------------------------------------


@pytest.mark.parametrize("value", NON_FINITE)
def test_kmeans_rejects_a_non_finite_row(value):
    x = with_bad(torch.randn(256, 16), value, 7, 3)
    with pytest.raises(ValueError, match=r"kmeans: x holds 1 non-finite value \(NaN or inf\) of 4096; clean or drop"):
        kmeans(x, 8, kmeans_iters=2)
    with pytest.raises(ValueError, match=r"kmeans: x holds 16 non-finite values \(NaN or inf\) of 8192"):
        kmeans(with_bad(torch.randn(2, 256, 16), value, 1, 5), 8, kmeans_iters=2)
    with pytest.raises(ValueError, match="kmeans: initial centroids holds 1 non-finite value"):
        kmeans(torch.randn(256, 16), 8, init=with_bad(torch.randn(8, 16), value, 0, 0))


def test_kmeans_rejects_inputs_whose_squares_overflow():
    with pytest.raises(ValueError, match="kmeans: x magnitude is too large: values up to 1e\\+30"):
        kmeans(with_bad(torch.randn(64, 16), 1e30, 0, 0), 4, kmeans_iters=1)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nearest_rejects_non_finite_queries_and_codes(metric):
    x, codes = torch.randn(100, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match=r"nearest: x holds 8 non-finite values \(NaN or inf\) of 800"):
        nearest(with_bad(x, float("nan"), 5), codes, metric)
    with pytest.raises(ValueError, match=r"nearest: codes holds 1 non-finite value \(NaN or inf\) of 128"):
        nearest(x, with_bad(codes, float("inf"), 2, 2), metric)
    with pytest.raises(ValueError, match="nearest: x magnitude is too large"):
        nearest(with_bad(x, 1e30, 0, 0), codes, metric)


# -- 3: codebooks and quantizers ---------------------------------------------------------------------


@pytest.mark.parametrize("value", NON_FINITE)
def test_codebook_rejects_non_finite_input_and_keeps_its_state(value):
    book = Codebook(8, 16, threshold_ema_dead_code=1.0)
    book(torch.randn(64, 8), update=True)
    before = state(book)
    for update in (True, False):
        with pytest.raises(ValueError, match=r"Codebook: input holds 8 non-finite values \(NaN or inf\) of 512"):
            book(with_bad(torch.randn(64, 8), value, 3), update=update)
    with pytest.raises(ValueError, match="Codebook: input magnitude is too large: values up to 1e\\+30"):
        book(torch.full((64, 8), 1e30), update=True)
    assert_same_state(before, book)


@pytest.mark.parametrize("name", list_quantizers())
@pytest.mark.parametrize("value", NON_FINITE)
def test_quantizers_reject_non_finite_input_in_train_and_eval(name, value):
    q = create_quantizer(name, **CONFIGS[name])
    q(torch.randn(64, q.dim))
    before = state(q)
    cls = type(q).__name__
    bad = with_bad(torch.randn(4, 16, q.dim), value, 1, 2, 3)
    for mode in (True, False):
        q.train(mode)
        with pytest.raises(ValueError, match=rf"{cls}: input holds 1 non-finite value \(NaN or inf\) of 1024"):
            q(bad)
    with pytest.raises(ValueError, match=rf"{cls}: input holds 1 non-finite value"):
        q.encode(bad)
    assert_same_state(before, q)


@pytest.mark.parametrize("name", list_quantizers())
def test_quantizers_reject_inputs_whose_squares_overflow(name):
    q = create_quantizer(name, **CONFIGS[name]).train()
    before = state(q)
    with pytest.raises(ValueError, match=rf"{type(q).__name__}: input magnitude is too large: values up to 1e\+30"):
        q(torch.full((8, q.dim), 1e30))
    assert_same_state(before, q)


# -- 4: empty batches --------------------------------------------------------------------------------


EMPTY_CASES = {name: (name, CONFIGS[name]) for name in list_quantizers()} | {
    v: VARIANTS[v] for v in ("vq-dead-codes", "vq-learnable", "rvq-dropout", "bsq-projected")
}


@pytest.mark.parametrize("case", sorted(EMPTY_CASES))
@pytest.mark.parametrize("trained", [False, True])
def test_empty_batches_are_a_no_op(case, trained):
    name, kwargs = EMPTY_CASES[case]
    q = create_quantizer(name, **kwargs)
    if trained:
        q(torch.randn(64, q.dim))
    before = state(q)
    for mode in (True, False):
        q.train(mode)
        x = torch.randn(0, q.dim, requires_grad=True)
        out = q(x)
        assert out.quantized.shape == (0, q.dim) and out.codes.shape == (0, q.spec.num_codebooks)
        assert out.loss.item() == 0.0
        assert all(torch.isfinite(v) for v in out.metrics.values())
        (out.quantized.sum() + out.loss).backward()
        assert q.encode(torch.randn(2, 0, q.dim)).shape == (2, 0, q.spec.num_codebooks)
    assert_same_state(before, q)
    q.train()
    q(torch.randn(64, q.dim))  # still trains afterwards


def test_codebook_update_on_an_empty_batch_changes_nothing():
    book = Codebook(8, 16, threshold_ema_dead_code=2.0)
    before = state(book)
    out = book(torch.randn(0, 8), update=True)  # neither k-means initialisation nor dead-code revival
    assert out.quantized.shape == (0, 8) and out.indices.shape == (0,)
    assert_same_state(before, book)
    assert not bool(book.initted)


# -- 5, 6: dtypes and autocast ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["vq-projected", "rvq-projected", "bsq-projected", "fsq"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_projected_quantizers_take_any_float_dtype(variant, dtype):
    name, kwargs = VARIANTS[variant] if variant in VARIANTS else (variant, CONFIGS[variant])
    q = create_quantizer(name, **kwargs).eval()
    x = torch.randn(2, 32, q.dim).to(dtype).requires_grad_(True)
    out = q(x)
    assert out.quantized.dtype == dtype and torch.isfinite(out.quantized.float()).all()
    assert torch.equal(out.codes, q(x.detach().float()).codes)  # the same values, cast to the projection's dtype
    out.quantized.float().sum().backward()
    assert x.grad.dtype == dtype
    q.train()
    assert torch.isfinite(q(x).loss)


@pytest.mark.parametrize("name", ["lfq", "bsq"])
@pytest.mark.parametrize("entropy", ["exact", "grouped", "factorised"])
def test_entropy_under_bf16_autocast_is_computed_in_float32(name, entropy):
    q = create_quantizer(name, dim=8, codebook_size=2**8, codebook_entropy=entropy)  # no projection
    x = torch.randn(512, 8)
    reference = q(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x)
    for metric in ("codebook_entropy", "per_sample_entropy"):
        torch.testing.assert_close(out.metrics[metric], reference.metrics[metric], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.loss, reference.loss, atol=1e-4, rtol=1e-4)


# -- 7: embedding codec --------------------------------------------------------------------------------


def small_codec() -> EmbeddingCodec:
    return EmbeddingCodec(8, num_codebooks=2, codebook_size=16, kmeans_iters=2)


def test_codec_rejects_non_finite_vectors_and_searches_only_when_ready():
    data = torch.randn(64, 8)
    codec = small_codec()
    with pytest.raises(ValueError, match="not fitted yet: call fit"):
        codec.search(torch.randn(2, 8), k=1)
    with pytest.raises(
        ValueError, match=r"EmbeddingCodec: the training vectors tensor holds 1 non-finite value \(NaN or inf\) of 512"
    ):
        codec.fit(with_bad(data, float("nan"), 3, 3))
    assert not bool(codec.fitted)
    codec.fit(data)
    with pytest.raises(ValueError, match=r"the database is empty: add\(vectors\) before search"):
        codec.search(torch.randn(2, 8), k=1)
    with pytest.raises(ValueError, match=r"EmbeddingCodec: the vectors tensor holds 8 non-finite values"):
        codec.add(with_bad(data, float("inf"), 10), batch_size=16)
    assert codec.database.shape[0] == 0  # nothing of the failed add was kept
    codec.add(data)
    with pytest.raises(ValueError, match=r"EmbeddingCodec: the queries tensor holds 1 non-finite value"):
        codec.search(with_bad(torch.randn(2, 8), float("nan"), 1, 0), k=1)
    with pytest.raises(ValueError, match="EmbeddingCodec: the queries tensor magnitude is too large"):
        codec.search(torch.full((2, 8), 1e30), k=1)
    assert codec.search(data[:2], k=1)[1].shape == (2, 1)


# -- 8: weight quantization ----------------------------------------------------------------------------


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 8))


@pytest.mark.parametrize("config", [KMeansConfig(3), IntGridConfig(4, group_size=16, gptq=True)])
def test_quantize_rejects_non_finite_weights_naming_the_module(config):
    model = mlp()
    with torch.no_grad():
        model[2].weight[1, 2] = float("nan")
    reference = state(model)
    with pytest.raises(ValueError, match=r"quantize_: the weight of module '2' holds 1 non-finite value .* of 128"):
        quantize_(model, config, calibration=[torch.randn(8, 32)], progress=False, verbose=False)
    assert isinstance(model[0], nn.Linear)  # nothing was swapped
    assert_same_state(reference, model)
    with pytest.raises(ValueError, match=r"^weight holds 1 non-finite value"):
        config.quantize(model[2].weight.detach(), torch.eye(16))


def test_gptq_rejects_non_finite_calibration_naming_the_module():
    config = IntGridConfig(4, group_size=16, gptq=True)
    batches = [torch.randn(8, 32), with_bad(torch.randn(8, 32), float("inf"), 4, 4)]
    with pytest.raises(
        ValueError, match=r"the calibration input of module '0' holds 1 non-finite value \(NaN or inf\) of 256"
    ):
        quantize_(mlp(), config, calibration=batches, progress=False, verbose=False)
    with pytest.raises(ValueError, match="the input second moments of module '0' holds .* rescale the calibration"):
        quantize_(mlp(), config, calibration=[torch.full((8, 32), 1e20)], progress=False, verbose=False)
    with pytest.raises(ValueError, match=r"^hessian holds 1 non-finite value"):
        config.quantize(torch.randn(8, 32), with_bad(torch.eye(32), float("nan"), 0, 0))


# -- 9: KV caches ---------------------------------------------------------------------------------------


def kv(tokens: int, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 2, tokens, dim), torch.randn(1, 2, tokens, dim)


def cache_makers():
    torch.manual_seed(0)
    codebooks = CoupledCodebooks.fit(*kv(64), CQConfig(group_size=4, codebook_size=8, kmeans_iters=2))
    vq = calibrate_quantizer("vq", torch.randn(64, 16), passes=1, codebook_size=8)
    kivi = KIVIConfig(group_size=8, window=4)
    return {
        "full": FullPrecisionLayerCache,
        "kivi": kivi.make_layer,
        "cq": lambda: CQLayerCache(codebooks),
        "quantizer": lambda: QuantizerLayerCache(vq, vq),
        "pre-rope": lambda: PreRoPELayerCache(kivi.make_layer(), rotary_tables(16)),
        "sparse": lambda: DenseAndSparseLayerCache(CQLayerCache(codebooks), 3, outlier_bounds(kv(32)[0], 0.1)),
        "sparse-no-sink": lambda: DenseAndSparseLayerCache(QuantizerLayerCache(vq, vq), 0),
    }


MAKERS = cache_makers()


@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("value", NON_FINITE)
def test_kv_caches_reject_non_finite_keys_and_values(kind, value):
    cache = MAKERS[kind]()
    cache.update(*kv(5))
    keys, values = kv(3)
    with pytest.raises(ValueError, match=r"keys tensor holds 1 non-finite value \(NaN or inf\) of 96; look for an"):
        cache.update(with_bad(keys, value, 0, 1, 2, 3), values)
    with pytest.raises(ValueError, match=r"values tensor holds 2 non-finite values \(NaN or inf\) of 96"):
        cache.update(keys, with_bad(values, value, 0, 1, 2, slice(0, 2)))
    assert cache.num_tokens == 5
    assert cache.update(keys, values)[0].shape == (1, 2, 8, 16)


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_kv_caches_take_zero_new_tokens(kind):
    cache = MAKERS[kind]()
    for tokens in (0, 2, 0, 6, 0):  # before any token, inside the sink, and past it
        got_keys, got_values = cache.update(*kv(tokens))
        assert got_keys.shape == got_values.shape == (1, 2, cache.num_tokens, 16)
    again = cache.update(*kv(0))
    assert torch.equal(again[0], got_keys) and torch.equal(again[1], got_values)


def test_kv_calibration_rejects_non_finite_data():
    keys, values = kv(32)
    with pytest.raises(ValueError, match="keys tensor holds 1 non-finite value"):
        CoupledCodebooks.fit(with_bad(keys, float("nan"), 0, 0, 0, 0), values, CQConfig(group_size=4, codebook_size=4))
    with pytest.raises(ValueError, match="outlier_bounds: calibration keys or values holds 1 non-finite value"):
        outlier_bounds(with_bad(keys, float("inf"), 0, 0, 0, 0), 0.1)
    with pytest.raises(ValueError, match="calibrate_quantizer: vectors holds 1 non-finite value"):
        calibrate_quantizer("vq", with_bad(torch.randn(64, 16), float("nan"), 0, 0), codebook_size=8)
