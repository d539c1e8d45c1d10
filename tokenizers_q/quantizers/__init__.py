"""Interchangeable quantizer layers; importing this package registers all of them."""

from tokenizers_q.quantizers.base import (
    Quantizer,
    QuantizerOutput,
    create_quantizer,
    list_quantizers,
    register_quantizer,
)
from tokenizers_q.quantizers.bsq import BSQ, LFQ
from tokenizers_q.quantizers.external import VectorQuantizePytorch
from tokenizers_q.quantizers.fsq import FSQ
from tokenizers_q.quantizers.pq import PQ
from tokenizers_q.quantizers.rvq import RVQ
from tokenizers_q.quantizers.vq import VQ

__all__ = [
    "BSQ",
    "FSQ",
    "LFQ",
    "PQ",
    "RVQ",
    "VQ",
    "Quantizer",
    "QuantizerOutput",
    "VectorQuantizePytorch",
    "create_quantizer",
    "list_quantizers",
    "register_quantizer",
]
