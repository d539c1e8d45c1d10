"""Residual vector quantization (Zeghidour et al., SoundStream) over any inner quantizer."""

from __future__ import annotations

import torch
from torch import nn

from tokenizers_q.checks import check_int
from tokenizers_q.metrics import merge_metrics
from tokenizers_q.packing import TokenSpec
from tokenizers_q.quantizers.base import (
    Quantizer,
    QuantizerOutput,
    create_quantizer,
    projections,
    register_quantizer,
)


@register_quantizer("rvq")
class RVQ(Quantizer):
    r"""Residual quantization: each stage quantizes what the previous stages left.

    Args:
        dim: size of the channel axis of the input.
        num_quantizers: number of residual stages. Default: 8.
        quantizer: registered name of the stage quantizer (``"vq"``, ``"fsq"``,
            ``"bsq"``, ...). Default: ``"vq"``.
        codebook_dim: size of the residual space; a shared projection maps
            ``dim`` to it and back when they differ. Default: ``dim``.
        quantize_dropout: in training, each vector keeps only its first ``d``
            stages, ``d`` drawn uniformly from
            ``[quantize_dropout_cutoff_index + 1, num_quantizers]`` per vector,
            so a decoder learns to use any prefix of the codes. All stages still
            run and update their statistics (no collective is ever skipped under
            DDP). Default: False.
        quantize_dropout_cutoff_index: stages up to this index are never dropped. Default: 0.
        channel_first: input is (B, dim, *spatial). Default: False.
        quantizer_kwargs: keyword arguments of the inner quantizer as one dict (the form
            configuration files use); merged with ``**kwargs``.
        **kwargs: passed to every stage, e.g. ``codebook_size=1024`` or
            ``levels=[8, 5, 5, 5]``.

    The loss is the sum of the stages' losses. Gradients reach the input once
    (as in EnCodec): later residuals carry no gradient back to the input.

    Shapes:
        - input: (*, dim), or (B, dim, *spatial) with ``channel_first``
        - quantized: same as input; codes: (*, total codebooks of the stages), int64
    """

    def __init__(
        self,
        dim: int,
        num_quantizers: int = 8,
        quantizer: str = "vq",
        codebook_dim: int | None = None,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        channel_first: bool = False,
        quantizer_kwargs: dict | None = None,
        **kwargs,
    ):
        super().__init__(dim, channel_first)
        quantizer_kwargs = {**(quantizer_kwargs or {}), **kwargs}
        check_int("num_quantizers", num_quantizers)
        if not 0 <= quantize_dropout_cutoff_index < num_quantizers:
            raise ValueError(
                f"quantize_dropout_cutoff_index must be in [0, {num_quantizers}), got {quantize_dropout_cutoff_index}"
            )
        inner_dim = check_int("codebook_dim", codebook_dim if codebook_dim is not None else dim)
        self.project_in, self.project_out = projections(dim, inner_dim)
        self.layers = nn.ModuleList(
            create_quantizer(quantizer, dim=inner_dim, **quantizer_kwargs) for _ in range(num_quantizers)
        )
        self.num_quantizers = num_quantizers
        self.quantize_dropout, self.quantize_dropout_cutoff_index = (
            quantize_dropout,
            quantize_dropout_cutoff_index,
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_quantizers={self.num_quantizers}, quantize_dropout={self.quantize_dropout}"

    @property
    def sub_quantizers(self) -> list[Quantizer]:
        return [part for stage in self.layers for part in stage.sub_quantizers]

    @property
    def spec(self) -> TokenSpec:
        return TokenSpec.concat([layer.spec for layer in self.layers])

    def _forward_flat(self, z: torch.Tensor, update: bool) -> QuantizerOutput:
        residual = self.project_in(z)
        total, codes, losses, metrics = 0.0, [], [], []
        keep = self._dropout_mask(z) if update and self.quantize_dropout else None
        for i, layer in enumerate(self.layers):
            out = layer._forward_flat(residual, update)
            residual = residual - out.quantized  # zero gradient to the input: out.quantized passes it straight through
            total = total + (out.quantized if keep is None else out.quantized * keep[:, i : i + 1])
            codes.append(out.codes)
            losses.append(out.loss)
            metrics.append(out.metrics)
        loss = torch.stack(losses).sum()
        return QuantizerOutput(self.project_out(total), torch.cat(codes, dim=-1), loss, merge_metrics(metrics))

    def _encode_flat(self, z: torch.Tensor) -> torch.Tensor:
        residual, codes = self.project_in(z), []
        for layer in self.layers:
            codes.append(layer._encode_flat(residual))
            residual = residual - layer._decode_flat(codes[-1])
        return torch.cat(codes, dim=-1)

    def _dropout_mask(self, z: torch.Tensor) -> torch.Tensor:
        """(N, num_quantizers) 0/1 mask keeping a random prefix of stages per vector."""
        low = self.quantize_dropout_cutoff_index + 1
        depth = torch.randint(low, self.num_quantizers + 1, (z.shape[0], 1), device=z.device)
        return (torch.arange(self.num_quantizers, device=z.device) < depth).to(z.dtype)

    def _decode_flat(self, codes: torch.Tensor) -> torch.Tensor:
        total, start = 0.0, 0
        for layer in self.layers:
            width = layer.spec.num_codebooks
            total = total + layer._decode_flat(codes[:, start : start + width])
            start += width
        return self.project_out(total)
