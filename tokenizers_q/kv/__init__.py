"""KV-cache compression: per-layer caches that store attention keys and values as codes."""

from tokenizers_q.kv.cache import FullPrecisionLayerCache, KVCache, LayerCache
from tokenizers_q.kv.coupled import CoupledCodebooks, CQConfig, CQLayerCache
from tokenizers_q.kv.kivi import KIVIConfig, KIVILayerCache
from tokenizers_q.kv.learned import QuantizerLayerCache, calibrate_quantizer

__all__ = [
    "CQConfig",
    "CQLayerCache",
    "CoupledCodebooks",
    "FullPrecisionLayerCache",
    "KIVIConfig",
    "KIVILayerCache",
    "KVCache",
    "LayerCache",
    "QuantizerLayerCache",
    "calibrate_quantizer",
]
