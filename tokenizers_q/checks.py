"""The checks of arguments and inputs shared by the whole library, and its one exception policy.

A wrong type raises :class:`TypeError`, a wrong value :class:`ValueError`; each message names the
argument, the value received and what was expected. Every public entry point that reads vectors
(k-means, nearest-code search, codebooks, quantizers, KV caches, weight quantization, the embedding
codec) calls :func:`check_finite` on them, so that a NaN, an inf or a value whose square overflows
float32 raises a :class:`ValueError` naming the tensor instead of silently producing NaN codebooks
or arbitrary codes.
"""

from __future__ import annotations

import math

import torch

FLOAT32_MAX = torch.finfo(torch.float32).max


def check_int(name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in ``[minimum, maximum]``; else a ``TypeError`` (not an int) or
    ``ValueError`` (out of range) naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum or (maximum is not None and value > maximum):
        if maximum is not None:
            expected = f"an int in [{minimum}, {maximum}]"
        else:
            expected = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def check_codebook_size(value, name: str = "codebook_size") -> int:
    """``value`` if it is a power of two in [2, 65536] (codes packed at ``log2`` of it bits each)."""
    check_int(name, value, 2, 2**16)
    if value & (value - 1):
        raise ValueError(f"{name} must be a power of two (codes are packed bits), got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    """``value`` if it is one of ``choices``; else a ``ValueError`` naming ``name`` and the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_float_tensor(name: str, x) -> torch.Tensor:
    """``x`` if it is a floating-point tensor; else a ``TypeError`` naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
    return x


def max_magnitude(dim: int) -> float:
    """Largest absolute value for which squared distances between ``dim``-vectors stay finite in float32.

    ``|x - c|^2`` sums ``dim`` squares of differences up to ``2 max|x|``, so it overflows above
    ``sqrt(FLOAT32_MAX / (4 dim))`` (about 2.3e18 at ``dim = 16``).
    """
    return math.sqrt(FLOAT32_MAX / (4 * dim))


def check_finite(
    x: torch.Tensor, name: str, max_abs: float | None = None, hint: str = "clean or drop those rows"
) -> None:
    """Raise a :class:`ValueError` naming ``name`` unless every entry of ``x`` is finite (and at most ``max_abs``).

    One reduction pass: ``aminmax`` (min and max propagate NaN and reach any inf, over 10x cheaper than
    ``isfinite(x).all()`` on large CPU tensors) and one device sync; the number of bad entries is
    counted only on failure. Integer and empty tensors pass; skipped while ``torch.compile`` traces
    (a data-dependent branch would break the graph).

    Args:
        x: the tensor to check.
        name: how the message names it, e.g. ``"kmeans: x"``.
        max_abs: also reject values larger in magnitude (see :func:`max_magnitude`); None: no bound.
        hint: what the caller should do, appended to the non-finite message.
    """
    if torch.compiler.is_compiling() or not x.dtype.is_floating_point or not x.numel():
        return
    low, high = torch.stack(torch.aminmax(x.detach())).tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int((~torch.isfinite(x.detach())).sum())
        raise ValueError(
            f"{name} holds {bad} non-finite value{'s' if bad != 1 else ''} (NaN or inf) of {x.numel()}; {hint}"
        )
    largest = max(-low, high)
    if max_abs is not None and largest > max_abs:
        raise ValueError(
            f"{name} magnitude is too large: values up to {largest:.3g}; above {max_abs:.3g} squared "
            f"distances overflow float32, rescale the input"
        )
