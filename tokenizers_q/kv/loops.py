"""Attention from KV codes on the CPU: C++ loops over the packed bytes (``loops.cpp``), which read each
token's codes once and never form a key or value tensor.

The extension is built with ``torch.utils.cpp_extension`` on first use (about a minute, once per machine:
torch keeps the build in ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). Where it cannot
be built (no C++ compiler) a warning says why, :func:`cpu_loops` returns None and the caches attend
through torch ops instead.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("loops.cpp")
_BUILT: dict = {}


def cpu_loops(*tensors: torch.Tensor):
    """The built extension when every tensor is on the CPU and it builds, else None (one warning if the build
    fails; it is not tried again)."""
    if any(t.device.type != "cpu" for t in tensors):
        return None
    if "module" not in _BUILT:
        from torch.utils import cpp_extension

        try:
            _BUILT["module"] = cpp_extension.load(
                "tokenizers_q_kv_loops",
                [str(_SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
                verbose=False,
            )
        except (OSError, RuntimeError, ImportError) as err:
            _BUILT["module"] = None
            message = f"the C++ loops of attention from KV codes did not build; torch ops instead: {err}"
            warnings.warn(message, stacklevel=3)
    return _BUILT["module"]


def kivi_scores(queries, key_bytes, key_scale, key_offset, bits: int):
    """``q . k`` for KIVI-coded keys, ``k = scale * level + offset`` per channel and group of tokens.

    Shapes:
        - queries: (B, H, Q, D) float32; key_bytes: (B, H, T, D * bits / 8) uint8, ``bits`` in 1, 2, 4, 8
        - key_scale, key_offset: (B, H, T / group, D) float16
        - output: (B, H, Q, T) float32, or None without the loops
    """
    loops = cpu_loops(queries, key_bytes)
    return None if loops is None else loops.kivi_scores(queries, key_bytes, key_scale, key_offset, bits)


def kivi_mix(probs, value_bytes, value_scale, value_offset, bits: int):
    """``sum_t p_t v_t`` for KIVI-coded values, ``v = scale * level + offset`` per token and channel group.

    Shapes:
        - probs: (B, H, Q, T) float32; value_bytes: (B, H, T, D * bits / 8) uint8
        - value_scale, value_offset: (B, H, T, channel groups) float16
        - output: (B, H, Q, D) float32, or None without the loops
    """
    loops = cpu_loops(probs, value_bytes)
    return None if loops is None else loops.kivi_mix(probs, value_bytes, value_scale, value_offset, bits)


def code_scores(lookup, codes, bits: int, tokens: int):
    """Per token, the sum over codebooks of the lookup entry its code picks.

    Shapes:
        - lookup: (B, H, Q, M, K) float32: ``q_i . entry`` of codebook ``m``, entry ``k``
        - codes: (B, H, bytes) uint8: each row the least-significant-bit-first stream of ``tokens x M`` codes
          of ``bits`` bits (1-16)
        - output: (B, H, Q, tokens) float32, or None without the loops
    """
    loops = cpu_loops(lookup, codes)
    return None if loops is None else loops.code_scores(lookup, codes, bits, tokens)


def code_mass(probs, codes, bits: int, books: int, entries: int):
    """The probability mass of every codebook entry: the sum of ``p_t`` over the tokens whose code it is.

    Shapes:
        - probs: (B, H, Q, T) float32; codes: as :func:`code_scores`, ``T x books`` codes a row
        - output: (B, H, Q, books, entries) float32, or None without the loops
    """
    loops = cpu_loops(probs, codes)
    return None if loops is None else loops.code_mass(probs, codes, bits, books, entries)
