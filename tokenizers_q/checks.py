"""Checks of numerical inputs shared by the whole library: non-finite values and magnitudes that overflow.

Every public entry point that reads vectors (k-means, nearest-code search, codebooks,
quantizers, KV caches, weight quantization, the embedding codec) calls
:func:`check_finite` on them, so that a NaN, an inf or a value whose square overflows
float32 raises a :class:`ValueError` naming the tensor instead of silently producing
NaN codebooks or arbitrary codes.
"""

from __future__ import annotations

import math

import torch

FLOAT32_MAX = torch.finfo(torch.float32).max


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
