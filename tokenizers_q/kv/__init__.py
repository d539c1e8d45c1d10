"""KV-cache compression: per-layer caches that store attention keys and values as codes."""

from tokenizers_q.kv.cache import FullPrecisionLayerCache, KVCache, LayerCache, attention
from tokenizers_q.kv.calibration import LayerCalibration, load_calibration, save_calibration
from tokenizers_q.kv.coupled import CoupledCodebooks, CQConfig, CQLayerCache
from tokenizers_q.kv.kivi import KIVIConfig, KIVILayerCache
from tokenizers_q.kv.learned import QuantizerLayerCache, calibrate_quantizer
from tokenizers_q.kv.nuq import NUQConfig, NUQLayerCache, NUQLevels
from tokenizers_q.kv.rope import PreRoPELayerCache, apply_rotary, rotary_tables
from tokenizers_q.kv.rotated import RotatedLayerCache
from tokenizers_q.kv.sparse import DenseAndSparseLayerCache, outlier_bounds

__all__ = [
    "CQConfig",
    "CQLayerCache",
    "CoupledCodebooks",
    "DenseAndSparseLayerCache",
    "FullPrecisionLayerCache",
    "KIVIConfig",
    "KIVILayerCache",
    "KVCache",
    "LayerCache",
    "LayerCalibration",
    "NUQConfig",
    "NUQLayerCache",
    "NUQLevels",
    "PreRoPELayerCache",
    "QuantizerLayerCache",
    "RotatedLayerCache",
    "apply_rotary",
    "attention",
    "calibrate_quantizer",
    "load_calibration",
    "outlier_bounds",
    "rotary_tables",
    "save_calibration",
]
