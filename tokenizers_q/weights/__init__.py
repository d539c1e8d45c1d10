"""Weight quantization of existing models on the shared core: ``quantize_(model, config)``."""

from tokenizers_q.weights.allocate import allocate_bits, output_error
from tokenizers_q.weights.config import WeightQuantConfig, register_weight_config
from tokenizers_q.weights.distill import distill_
from tokenizers_q.weights.gaussian import GaussianGridConfig, gaussian_levels
from tokenizers_q.weights.gptq import HessianAccumulator, gptq
from tokenizers_q.weights.grid import IntGridConfig
from tokenizers_q.weights.modules import QuantizedEmbedding, QuantizedLinear, QuantizedWeight
from tokenizers_q.weights.nf4 import NF4_LEVELS, NF4Config
from tokenizers_q.weights.nonuniform import KMeansConfig
from tokenizers_q.weights.quantize import (
    collect_hessians,
    format_summary,
    load_quantized,
    model_bits_per_weight,
    quantize_,
    save_quantized,
)
from tokenizers_q.weights.rotated import RotatedConfig
from tokenizers_q.weights.ternary import TernaryConfig
from tokenizers_q.weights.vector import VectorCodebookConfig

__all__ = [
    "NF4_LEVELS",
    "GaussianGridConfig",
    "HessianAccumulator",
    "IntGridConfig",
    "KMeansConfig",
    "NF4Config",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedWeight",
    "RotatedConfig",
    "TernaryConfig",
    "VectorCodebookConfig",
    "WeightQuantConfig",
    "allocate_bits",
    "collect_hessians",
    "distill_",
    "format_summary",
    "gaussian_levels",
    "gptq",
    "load_quantized",
    "model_bits_per_weight",
    "output_error",
    "quantize_",
    "register_weight_config",
    "save_quantized",
]
