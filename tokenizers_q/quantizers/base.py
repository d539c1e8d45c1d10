"""The quantizer contract, its output type and the registry.

Every quantizer takes channel-last input ``(..., dim)`` (or channel-first maps
with ``channel_first=True``), returns a :class:`QuantizerOutput`, and offers
``encode`` / ``decode`` with ``decode(encode(x)) == forward(x).quantized`` in
eval mode. ``encode``, ``decode`` and ``forward`` take flat rows ``(N, dim)`` as
well as any leading shape. Others read a quantizer through its public parts only:
``spec`` (the token layout), ``sub_quantizers`` (one single-codebook quantizer per
code column), ``codebooks()`` (the stored codebook tensors) and ``code_vectors()``
(the vector of every code of every codebook). Subclasses implement
``_forward_flat``, ``_decode_flat`` and ``spec`` on flattened rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from tokenizers_q.checks import check_finite, check_int, max_magnitude
from tokenizers_q.packing import TokenSpec


class QuantizerOutput(NamedTuple):
    """What every quantizer returns.

    Shapes:
        - quantized: same shape and dtype as the input; straight-through gradient
        - codes: (..., num_codebooks), int64 (channel axis replaced by codebooks)
        - loss: () scalar, already weighted
        - metrics: dict of detached scalars (usage, perplexity, dead codes, ...)
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


_REGISTRY: dict[str, type[Quantizer]] = {}


def register_quantizer(name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    """Class decorator adding a quantizer to :func:`create_quantizer` under ``name``."""

    def add(cls: type[Quantizer]) -> type[Quantizer]:
        if name in _REGISTRY:
            raise ValueError(f"quantizer name {name!r} is already registered by {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        return cls

    return add


def list_quantizers() -> list[str]:
    """Names accepted by :func:`create_quantizer`, sorted."""
    return sorted(_REGISTRY)


def get_quantizer_class(name: str) -> type[Quantizer]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown quantizer {name!r}; choose one of: {', '.join(list_quantizers())}")
    return _REGISTRY[name]


def create_quantizer(name: str, **kwargs) -> Quantizer:
    """Build a registered quantizer, e.g. ``create_quantizer("fsq", levels=[8, 5, 5, 5])``; it keeps its
    ``init_args`` (the name and keyword arguments) so that files can rebuild it by name."""
    quantizer = get_quantizer_class(name)(**kwargs)
    quantizer.init_args = {"name": name, "kwargs": kwargs}
    return quantizer


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value of ``q`` with the gradient of ``x`` (the straight-through estimator).

    Unlike ``x + (q - x).detach()`` the value is exactly ``q`` and no (N, D)
    temporaries are allocated.

    Shapes:
        - x, q: (*, D), same shape and dtype
        - output: (*, D)
    """
    return _StraightThrough.apply(x, q.detach())


class Projection(nn.Linear):
    """A linear map that casts its input to its own dtype: float32 weights take float16, bfloat16 or
    float64 input (under autocast the matmul still runs in the autocast dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


def projections(dim: int, inner_dim: int) -> tuple[nn.Module, nn.Module]:
    """Linear maps into and out of the quantizer's space, or identities when sizes agree."""
    if dim == inner_dim:
        return nn.Identity(), nn.Identity()
    return Projection(dim, inner_dim), Projection(inner_dim, dim)


class Quantizer(nn.Module):
    """Base class: validation, channel handling, flattening, ``encode``/``decode``.

    Args:
        dim: size of the channel axis of the input.
        channel_first: the channel axis is axis 1 (``(B, dim, *spatial)``), as
            in convolutional feature maps; codes are then ``(B, *spatial, C)``.
    """

    def __init__(self, dim: int, channel_first: bool = False):
        super().__init__()
        self.dim = check_int("dim", dim)
        self.channel_first = channel_first

    # -- implemented by subclasses -------------------------------------------------
    @property
    def spec(self) -> TokenSpec:
        """The :class:`TokenSpec` of this quantizer's codes."""
        raise NotImplementedError

    def _forward_flat(self, z: torch.Tensor, update: bool) -> QuantizerOutput:
        """Quantize rows ``z`` (N, dim) -> quantized (N, dim), codes (N, num_codebooks).

        ``update`` turns on training behaviour: statistics, k-means init, dead-code
        revival, quantize dropout. With ``update=False`` no state may change.
        """
        raise NotImplementedError

    def _decode_flat(self, codes: torch.Tensor) -> torch.Tensor:
        """Vectors of validated codes (N, num_codebooks) -> (N, dim)."""
        raise NotImplementedError

    # -- the public contract -------------------------------------------------------
    @property
    def sub_quantizers(self) -> list[Quantizer]:
        """The single-codebook quantizers whose codes make up this one's, one per code column: RVQ's stages and
        PQ's groups (flattened when nested); ``[self]`` for a quantizer with one codebook."""
        if self.spec.num_codebooks == 1:
            return [self]
        raise ValueError(f"{type(self).__name__} has {self.spec.num_codebooks} codebooks but lists no sub-quantizers")

    def codebooks(self) -> list[torch.Tensor]:
        """The stored codebook tensors (one (K, e) table of every :class:`~tokenizers_q.codebook.Codebook` inside,
        in module order); empty for quantizers whose codes are implicit (FSQ, BSQ/LFQ)."""
        from tokenizers_q.codebook import Codebook

        return [module.embed for module in self.modules() if isinstance(module, Codebook)]

    @torch.no_grad()
    def code_vectors(self) -> list[torch.Tensor]:
        """The vector of every code of every codebook, in the space its sub-quantizer reads (before an enclosing
        quantizer's output projection): one (K_c, e_c) float32 tensor per code column.

        Shapes:
            - output: list of ``spec.num_codebooks`` tensors (codebook_size_c, e_c)
        """
        vectors = []
        for part in self.sub_quantizers:
            size = part.spec.codebook_sizes[0]
            device = next(iter([*part.parameters(), *part.buffers()]), torch.empty(0)).device
            vectors.append(part._decode_flat(torch.arange(size, device=device).unsqueeze(1)).float())
        return vectors

    def _rows(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Validate ``x`` and return its channel-last rows (N, dim) and leading shape."""
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} expects a floating-point input, got dtype {x.dtype}")
        axis = 1 if self.channel_first else -1
        if x.dim() < (2 if self.channel_first else 1) or x.shape[axis] != self.dim:
            where = "channel dim (axis 1)" if self.channel_first else "last dim"
            raise ValueError(f"{name} expects input with {where} {self.dim}, got shape {tuple(x.shape)}")
        check_finite(x, f"{name}: input", max_magnitude(self.dim))
        if self.channel_first:
            x = x.movedim(1, -1)
        return x.reshape(-1, self.dim), tuple(x.shape[:-1])

    def _restore(self, rows: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
        out = rows.reshape(*lead, rows.shape[-1])
        return out.movedim(-1, 1) if self.channel_first else out

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        """Quantize ``x``; in training mode also update the quantizer's statistics.

        An empty input gives empty quantized vectors and codes, a zero loss, and changes no state.

        Shapes:
            - x: (..., dim), or (B, dim, *spatial) with ``channel_first``
            - output: :class:`QuantizerOutput`
        """
        rows, lead = self._rows(x)
        out = self._forward_flat(rows, update=self.training)
        quantized = self._restore(out.quantized.to(x.dtype), lead)
        codes = out.codes.reshape(*lead, out.codes.shape[-1])
        # the mean of no terms is NaN; nan_to_num keeps the graph, so every parameter still gets a (zero) gradient
        loss = out.loss if rows.shape[0] else out.loss.nan_to_num(0.0)
        return QuantizerOutput(quantized, codes, loss, out.metrics)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of ``x`` without gradient or any change of state (also in training mode).

        Shapes:
            - x: (..., dim), or (B, dim, *spatial) with ``channel_first``
            - output: (..., num_codebooks), int64
        """
        rows, lead = self._rows(x)
        codes = self._encode_flat(rows)
        return codes.reshape(*lead, codes.shape[-1])

    def _encode_flat(self, z: torch.Tensor) -> torch.Tensor:
        """Codes (N, num_codebooks) of rows (N, dim): by default the forward pass's, without updates; quantizers
        that can skip its losses and metrics override it."""
        return self._forward_flat(z, update=False).codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Quantized vectors of ``codes``; raises on wrong dtype, shape or range.

        Shapes:
            - codes: (..., num_codebooks), integer
            - output: (..., dim), or (B, dim, *spatial) with ``channel_first``
        """
        spec = self.spec
        spec.check_codes(codes)
        lead = tuple(codes.shape[:-1])
        rows = self._decode_flat(codes.reshape(-1, spec.num_codebooks).long())
        return self._restore(rows, lead)
