"""tokenizers_q: discrete representations for PyTorch.

The core imports torch, numpy and safetensors only; it never
imports lightning or wandb (those live in ``tokenizers_q.trainers``).
"""

from tokenizers_q.codebook import Codebook, CodebookOutput
from tokenizers_q.kmeans import KMeansResult, kmeans
from tokenizers_q.packing import TokenFile, TokenSpec, load_tokens, pack_codes, save_tokens, unpack_codes
from tokenizers_q.quantizers import (
    BSQ,
    FSQ,
    LFQ,
    PQ,
    RVQ,
    VQ,
    Quantizer,
    QuantizerOutput,
    VectorQuantizePytorch,
    create_quantizer,
    list_quantizers,
    register_quantizer,
)
from tokenizers_q.search import nearest

__version__ = "0.1.0"

__all__ = [
    "BSQ",
    "FSQ",
    "LFQ",
    "PQ",
    "RVQ",
    "VQ",
    "Codebook",
    "CodebookOutput",
    "KMeansResult",
    "Quantizer",
    "QuantizerOutput",
    "TokenFile",
    "TokenSpec",
    "VectorQuantizePytorch",
    "create_quantizer",
    "kmeans",
    "list_quantizers",
    "load_tokens",
    "nearest",
    "pack_codes",
    "register_quantizer",
    "save_tokens",
    "unpack_codes",
]
