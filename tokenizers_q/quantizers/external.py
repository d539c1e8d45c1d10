"""vector-quantize-pytorch's quantizers behind this library's quantizer contract.

:class:`VectorQuantizePytorch` wraps one module of ``vector_quantize_pytorch`` (named from a fixed list, so that a
saved config only ever builds one of those classes) and gives it the contract of every quantizer here: one
:class:`~tokenizers_q.quantizers.base.QuantizerOutput` with a scalar loss and the library's usage metrics, a
:class:`~tokenizers_q.packing.TokenSpec`, ``encode`` without any change of state, ``decode``, and codebook
synchronisation under DDP decided at call time.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tokenizers_q.checks import check_choice
from tokenizers_q.distributed import is_distributed
from tokenizers_q.instantiate import instantiate
from tokenizers_q.metrics import code_counts, merge_metrics, usage_metrics
from tokenizers_q.packing import TokenSpec
from tokenizers_q.quantizers.base import Quantizer, QuantizerOutput

#: the vector_quantize_pytorch classes a config may name. Each meets ``decode(encode(x)) == forward(x).quantized``
#: in eval mode (tests/test_external_quantizer.py). Left out: the Grouped* variants (codes with a group axis in
#: front of the batch), RandomProjectionQuantizer (no decode), EvoLFQ / FSP / BinaryMapper / HierarchicalVQ
#: (other return conventions; not checked).
WRAPPED_CLASSES = (
    "FSQ",
    "LFQ",
    "LatentQuantize",
    "ResidualFSQ",
    "ResidualLFQ",
    "ResidualSimVQ",
    "ResidualVQ",
    "SimVQ",
    "VectorQuantize",
)
RESIDUAL_CLASSES = ("ResidualFSQ", "ResidualLFQ", "ResidualSimVQ", "ResidualVQ")
#: classes that read channel-first maps (B, dim, N) whatever they are told
CHANNEL_FIRST_CLASSES = ("LatentQuantize",)
#: classes built from the VectorQuantize codebook, whose EMA statistics the adapter synchronises under DDP
EMA_CLASSES = ("VectorQuantize", "ResidualVQ")

_LAYOUT = "the adapter feeds channel-last rows; pass channel_first to VectorQuantizePytorch instead"
#: keyword arguments the adapter refuses: (predicate on the value that is refused, why)
_REFUSED = {
    "channel_first": (bool, _LAYOUT),
    "is_channel_first": (bool, _LAYOUT),
    "accept_image_fmap": (bool, _LAYOUT),
    "accept_3d_fmap": (bool, _LAYOUT),
    "channel_last": (lambda v: not v, _LAYOUT),
    "return_indices": (lambda v: not v, "the adapter needs the codes"),
    "quantize_dropout": (
        bool,
        "dropped stages get code -1, outside the codebook (tokenizers_q.RVQ has a dropout with valid codes)",
    ),
    "affine_param": (bool, "the affine batch statistics change in eval mode, so encode would change state"),
    "in_place_codebook_optimizer": (
        lambda v: v is not None,
        "it steps an optimizer inside forward, and a callable cannot be saved in a config",
    ),
}


def _import_vqp():
    try:
        import vector_quantize_pytorch
    except ImportError as err:
        raise ImportError(
            "VectorQuantizePytorch needs the package vector-quantize-pytorch: pip install 'tokenizers_q[vqp]'"
        ) from err
    return vector_quantize_pytorch


class VectorQuantizePytorch(Quantizer):
    r"""A quantizer of vector-quantize-pytorch (``pip install 'tokenizers_q[vqp]'``) as a library quantizer.

    The wrapped module sees the flattened input as one sequence of channel-last rows ``(1, N, dim)``
    (``LatentQuantize``: ``(1, dim, N)``, the layout it reads). Its codes become int64 ``(..., num_codebooks)``
    (one column per head / codebook / residual stage), its losses one scalar (zero where it has none, e.g.
    FSQ), and the metrics the library's usage and perplexity of the batch's codes.

    With ``update=False`` (eval mode, and ``encode`` always) the wrapped module runs in eval mode and a
    VectorQuantize codebook waiting for its k-means initialisation is not initialised, so no buffer changes;
    the training flags are restored afterwards.

    DDP: vector-quantize-pytorch decides at construction whether its codebooks synchronise (before Lightning
    creates the process group, so ranks would diverge silently). The adapter builds them unsynchronised and
    switches the sync of the EMA statistics, k-means initialisation and dead-code sampling on before every
    training forward when a process group of more than one rank is live (:func:`~tokenizers_q.distributed.
    is_distributed`), off otherwise; ``kwargs={"sync_codebook": False}`` keeps it off, ``sync_kmeans=False``
    keeps k-means local. LFQ's batch entropy is averaged over ranks by vector-quantize-pytorch's own cached
    check, which the adapter re-evaluates before every training forward.

    Args:
        name: the class of ``vector_quantize_pytorch``, one of :data:`WRAPPED_CLASSES`.
        kwargs: its constructor keywords; ``dim`` (or the class's own default) fixes the size of the channel
            axis. Values that are ``class_path``/``init_args`` dicts (e.g. SimVQ's ``codebook_transform``) are
            built through :func:`tokenizers_q.instantiate.instantiate`. Layout keywords (``channel_first``,
            ``accept_image_fmap``, ...), quantize dropout, affine parameters and in-place optimizers are refused.
        channel_first: input is (B, dim, *spatial). Default: False.

    Shapes:
        - input: (*, dim), or (B, dim, *spatial) with ``channel_first``
        - quantized: same as input; codes: (*, num_codebooks), int64

    Example (YAML)::

        quantizer:
          class_path: tokenizers_q.VectorQuantizePytorch
          init_args: {name: FSQ, kwargs: {levels: [8, 5, 5, 5], dim: 32}, channel_first: true}
    """

    def __init__(self, name: str, kwargs: dict[str, Any] | None = None, *, channel_first: bool = False):
        check_choice("name", name, WRAPPED_CLASSES)
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, dict) or "class_path" in kwargs:
            raise TypeError(f"kwargs must be a dict of {name}'s keyword arguments, got {kwargs!r}")
        for key, (refused, why) in _REFUSED.items():
            if key in kwargs and refused(kwargs[key]):
                raise ValueError(f"VectorQuantizePytorch does not take {key}={kwargs[key]!r} for {name}: {why}")
        vqp = _import_vqp()
        cls = getattr(vqp, name, None)
        if cls is None:
            raise ImportError(f"vector_quantize_pytorch has no {name}; upgrade it: pip install 'tokenizers_q[vqp]'")
        built = instantiate(dict(kwargs))  # nested class_path dicts -> modules, through the allow-list
        sync = False
        if name in EMA_CLASSES:
            sync = built.pop("sync_codebook", None) is not False
            built["sync_codebook"] = False  # built unsynchronised: the adapter switches it at call time
        dim = kwargs.get("dim")
        try:
            wrapped = cls(**built)
        except (AssertionError, TypeError) as err:
            if dim is None and isinstance(err, TypeError) and "'dim'" in str(err):
                raise ValueError(f"kwargs of {name} need 'dim' (the size of the input's channel axis)") from None
            raise ValueError(f"vector_quantize_pytorch.{name} refused kwargs {kwargs!r}: {err}") from None
        dim = getattr(wrapped, "dim", dim)
        if not isinstance(dim, int):
            raise ValueError(f"cannot determine the dim of {name} from kwargs {kwargs!r}: pass 'dim' in kwargs")
        super().__init__(dim, channel_first)
        self.name = name
        self.wrapped = wrapped
        self.sync_codebook = sync
        self.sync_kmeans = bool(kwargs.get("sync_kmeans", True))
        self._spec = _token_spec(name, wrapped)
        if name == "LatentQuantize":
            inexact = [lv for lv in wrapped._levels.tolist() if lv & (lv - 1) and (lv - 1) & (lv - 2)]
            if inexact:
                # its codes_to_indices truncates (no rounding) the index computed from the level's values, which
                # are exact binary fractions only for these levels; others give codes off by one
                raise ValueError(
                    f"LatentQuantize levels must be powers of two or one more than a power of two (2, 3, 4, 5, 8, "
                    f"9, 16, 17, ...), got {inexact} in levels {wrapped._levels.tolist()}"
                )
            # its values per latent never get a gradient (its straight-through detaches them; DDP would refuse
            # parameters without one), and codes_to_indices / indices_to_codes assume their initial grid: keep
            # them as buffers (same state_dict keys), which also move with the module (a plain list would not)
            wrapped.values_per_latent = FixedValues(list(wrapped.values_per_latent))

    def extra_repr(self) -> str:
        return f"name={self.name}, dim={self.dim}, codebook_sizes={self._spec.codebook_sizes}"

    @property
    def spec(self) -> TokenSpec:
        return self._spec

    # -- the wrapped module ---------------------------------------------------------------
    def _vq_codebooks(self) -> list[nn.Module]:
        """vector-quantize-pytorch's ``Codebook`` modules inside (each once: ResidualVQ may share one)."""
        if self.name not in EMA_CLASSES:
            return []
        from vector_quantize_pytorch.vector_quantize_pytorch import Codebook

        return list({id(m): m for m in self.wrapped.modules() if isinstance(m, Codebook)}.values())

    def _set_sync(self, on: bool) -> None:
        """Switch the DDP synchronisation of every VectorQuantize codebook (what vector-quantize-pytorch's
        ``Codebook.__init__`` derives from ``use_ddp`` and ``sync_kmeans``), and let LFQ re-check for a group."""
        from vector_quantize_pytorch import vector_quantize_pytorch as core

        for codebook in self._vq_codebooks():
            kmeans = on and self.sync_kmeans
            if kmeans and codebook.num_codebooks > 1 and not bool(codebook.initted):
                raise ValueError(
                    "vector-quantize-pytorch cannot synchronise the k-means initialisation of separate codebooks "
                    "per head; pass kmeans_init=False or sync_kmeans=False"
                )
            codebook.use_ddp = on
            codebook.all_reduce_fn = dist.all_reduce if on else core.noop
            codebook.kmeans_all_reduce_fn = dist.all_reduce if kmeans else core.noop
            sample = core.sample_vectors_distributed if kmeans else core.batched_sample_vectors
            codebook.sample_fn = codebook.replace_sample_fn = sample
        if self.name in ("LFQ", "ResidualLFQ"):
            from vector_quantize_pytorch import lookup_free_quantization

            lookup_free_quantization.is_distributed.cache_clear()

    @contextmanager
    def _frozen(self):
        """The wrapped module in eval mode, with no k-means initialisation; training flags restored after."""
        modes = [(m, m.training) for m in self.wrapped.modules()]
        waiting = [c.initted for c in self._vq_codebooks() if not bool(c.initted)]
        self.wrapped.eval()
        for flag in waiting:
            flag.fill_(True)
        try:
            yield
        finally:
            for flag in waiting:
                flag.fill_(False)
            for module, mode in modes:
                module.training = mode

    def _dtype(self) -> torch.dtype:
        floats = (t.dtype for t in [*self.wrapped.parameters(), *self.wrapped.buffers()] if t.is_floating_point())
        return next(floats, torch.float32)

    # -- the contract -----------------------------------------------------------------------
    def _forward_flat(self, z: torch.Tensor, update: bool) -> QuantizerOutput:
        n, num_codebooks = z.shape[0], self._spec.num_codebooks
        if n == 0:
            codes = torch.zeros(0, num_codebooks, dtype=torch.long, device=z.device)
            return QuantizerOutput(z * 0.0, codes, z.new_zeros((), dtype=torch.float32), {})
        x = z.to(self._dtype())
        x = x.t().unsqueeze(0) if self.name in CHANNEL_FIRST_CLASSES else x.unsqueeze(0)
        if update:
            self._set_sync(self.sync_codebook and is_distributed())
            out = self.wrapped(x)
        else:
            with self._frozen():
                out = self.wrapped(x)
        quantized = out[0][0]
        quantized = quantized.t() if self.name in CHANNEL_FIRST_CLASSES else quantized
        codes = out[1].reshape(n, -1).long()
        if codes.shape[1] != num_codebooks:
            raise RuntimeError(f"{self.name} returned {codes.shape[1]} code columns, its spec says {num_codebooks}")
        loss = out[2] if len(out) > 2 and isinstance(out[2], torch.Tensor) else None
        loss = z.new_zeros((), dtype=torch.float32) if loss is None else loss.to(z.device, torch.float32).sum()
        return QuantizerOutput(quantized, codes, loss, self._metrics(codes))

    def _metrics(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = [usage_metrics(code_counts(codes[:, c], k)) for c, k in enumerate(self._spec.codebook_sizes)]
        return parts[0] if len(parts) == 1 else merge_metrics(parts)

    def _decode_flat(self, codes: torch.Tensor) -> torch.Tensor:
        indices = codes.unsqueeze(0) if self._spec.num_codebooks > 1 else codes.t()  # (1, N, C) or (1, N)
        decode = getattr(self.wrapped, "get_output_from_indices", None) or self.wrapped.indices_to_codes
        out = decode(indices)[0]
        return out.t() if self.name in CHANNEL_FIRST_CLASSES else out

    def codebooks(self) -> list[torch.Tensor]:
        """The stored codebook tensors as vector-quantize-pytorch keeps them: each VectorQuantize codebook's
        ``embed`` ((1 or heads, K, e)) and SimVQ's frozen codebook (K, e); empty for implicit grids (FSQ, LFQ,
        LatentQuantize and their residual forms)."""
        tables = [c.embed for c in self._vq_codebooks()]
        tables += [
            m.frozen_codebook
            for m in self.wrapped.modules()
            if isinstance(getattr(m, "frozen_codebook", None), torch.Tensor)
        ]
        return tables

    @torch.no_grad()
    def code_vectors(self) -> list[torch.Tensor]:
        """The vector of every code of every codebook: single-codebook classes through :meth:`decode`, residual
        ones stage by stage in the residual space (the wrapped ``get_codes_from_indices``, before the output
        projection)."""
        if self._spec.num_codebooks == 1 or self.name not in RESIDUAL_CLASSES:
            return super().code_vectors()
        device = next(iter([*self.wrapped.parameters(), *self.wrapped.buffers()]), torch.empty(0)).device
        vectors = []
        for stage, size in enumerate(self._spec.codebook_sizes):
            indices = torch.zeros(1, size, self._spec.num_codebooks, dtype=torch.long, device=device)
            indices[0, :, stage] = torch.arange(size, device=device)
            vectors.append(self.wrapped.get_codes_from_indices(indices)[stage, 0].float())
        return vectors


class FixedValues(nn.Module):
    """A list of tensors held as buffers named ``"0"``, ``"1"``, ... (the keys of an ``nn.ParameterList``)."""

    def __init__(self, values: list[torch.Tensor]):
        super().__init__()
        self.size = len(values)
        for i, value in enumerate(values):
            self.register_buffer(str(i), value.detach().clone())

    def __getitem__(self, index: int) -> torch.Tensor:
        return getattr(self, str(range(self.size)[index]))

    def __len__(self) -> int:
        return self.size


def _token_spec(name: str, wrapped: nn.Module) -> TokenSpec:
    """The TokenSpec of a wrapped module: its codebook sizes, one column per head / codebook / stage, and the
    mixed-radix factors of the implicit grids (levels, first least significant; bits)."""
    if name == "VectorQuantize":
        return TokenSpec((wrapped.codebook_size,) * wrapped.heads)
    if name == "ResidualVQ":
        return TokenSpec(tuple(wrapped.codebook_sizes))
    if name == "SimVQ":
        return TokenSpec((wrapped.codebook_size,))
    if name == "ResidualSimVQ":
        return TokenSpec((wrapped.codebook_size,) * wrapped.num_quantizers)
    layers = list(wrapped.layers) if name in RESIDUAL_CLASSES else [wrapped]
    if name in RESIDUAL_CLASSES and any(layer.num_codebooks != 1 for layer in layers):
        raise ValueError(f"{name} with num_codebooks > 1 per stage is not supported")
    columns = len(layers) * layers[0].num_codebooks
    if name in ("LFQ", "ResidualLFQ"):
        factors = (2,) * layers[0].codebook_dim
    else:  # FSQ, ResidualFSQ, LatentQuantize
        factors = tuple(int(level) for level in layers[0]._levels.tolist())
    size = math.prod(factors)
    if size != layers[0].codebook_size:
        raise ValueError(f"{name}: its codebook_size {layers[0].codebook_size} is not the product of {factors}")
    return TokenSpec((size,) * columns, (factors,) * columns)
