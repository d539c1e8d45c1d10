"""One bit-accounting protocol: ``stored_bits()`` is what the object holds, shared tables are counted once by
``shared_bits`` in their stored dtype, and each application's rate is derived from them."""

import pytest
import torch

from tokenizers_q.kv import CoupledCodebooks, CQConfig, CQLayerCache, KIVIConfig, KIVILayerCache
from tokenizers_q.kv.learned import QuantizerLayerCache, calibrate_quantizer
from tokenizers_q.memory import held_bytes, shared_bits
from tokenizers_q.quantizers import create_quantizer
from tokenizers_q.weights import IntGridConfig, NF4Config, QuantizedLinear


@pytest.mark.parametrize("config", [IntGridConfig(4, group_size=64), NF4Config(group_size=64)])
def test_quantized_layer_stored_bits_are_the_bytes_it_holds(config):
    weight = torch.randn(32, 128)
    layer = QuantizedLinear((32, 128), config, config.quantize(weight))
    stored = {name: getattr(layer, name) for name in layer.stored}
    assert layer.stored_bits() == 8 * held_bytes(stored)
    assert layer.bits_per_weight() == layer.stored_bits() / weight.numel()


def test_shared_bits_count_parameters_and_codebooks_once_in_their_dtype():
    vq = create_quantizer("vq", dim=8, codebook_size=32)  # EMA codebook: a buffer, not a parameter
    assert shared_bits(vq) == 32 * 8 * 32
    assert shared_bits(vq.half()) == 32 * 8 * 16
    rvq = create_quantizer("rvq", dim=8, num_quantizers=3, codebook_size=16, codebook_dim=4)
    projections = sum(p.numel() for p in rvq.parameters())
    assert shared_bits(rvq) == 32 * (projections + 3 * 16 * 4)
    assert shared_bits(create_quantizer("fsq", levels=[8, 5, 5])) == 0


def test_every_cache_counts_its_codes_and_optionally_its_tables():
    keys, values = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    quantizer = calibrate_quantizer("vq", keys.reshape(-1, 16), codebook_size=16)
    plain = QuantizerLayerCache(quantizer, quantizer)
    counted = QuantizerLayerCache(quantizer, quantizer, count_codebooks=True)
    books = CoupledCodebooks.fit(keys, values, CQConfig(group_size=4, codebook_size=16, kmeans_iters=2))
    cq, cq_counted = CQLayerCache(books), CQLayerCache(books, count_codebooks=True)
    for cache in (plain, counted, cq, cq_counted, KIVILayerCache(KIVIConfig(group_size=8, window=8))):
        cache.update(keys, values)
        assert cache.bits_per_element() == cache.stored_bits() / (2 * keys.numel())
    assert counted.stored_bits() == plain.stored_bits() + 2 * shared_bits(quantizer)
    assert cq_counted.stored_bits() == cq.stored_bits() + books.stored_bits()
    assert books.stored_bits() == 8 * (held_bytes(books.keys) + held_bytes(books.values))  # float16 as stored
