"""Product quantization (Jegou et al., 2011): independent quantizers on channel groups."""

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
    register_quantizer,
)


@register_quantizer("pq")
class PQ(Quantizer):
    r"""Split the channel axis into ``num_groups`` equal groups, quantize each separately.

    Args:
        dim: size of the channel axis; must be divisible by ``num_groups``.
        num_groups: number of channel groups (sub-quantizers). Default: 4.
        quantizer: registered name of the per-group quantizer. Default: ``"vq"``.
        channel_first: input is (B, dim, *spatial). Default: False.
        quantizer_kwargs: keyword arguments of the inner quantizer as one dict (the form
            configuration files use); merged with ``**kwargs``.
        **kwargs: passed to every group's quantizer, e.g. ``codebook_size=256``.

    The loss is the mean of the groups' losses, so it stays on the scale of a
    single quantizer over the whole vector.

    Shapes:
        - input: (*, dim), or (B, dim, *spatial) with ``channel_first``
        - quantized: same as input; codes: (*, total codebooks of the groups), int64
    """

    def __init__(
        self,
        dim: int,
        num_groups: int = 4,
        quantizer: str = "vq",
        channel_first: bool = False,
        quantizer_kwargs: dict | None = None,
        **kwargs,
    ):
        super().__init__(dim, channel_first)
        quantizer_kwargs = {**(quantizer_kwargs or {}), **kwargs}
        check_int("num_groups", num_groups)
        if dim % num_groups:
            raise ValueError(f"PQ needs dim divisible by num_groups, got dim={dim}, num_groups={num_groups}")
        self.num_groups, self.group_dim = num_groups, dim // num_groups
        self.groups = nn.ModuleList(
            create_quantizer(quantizer, dim=self.group_dim, **quantizer_kwargs) for _ in range(num_groups)
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_groups={self.num_groups}, group_dim={self.group_dim}"

    @property
    def sub_quantizers(self) -> list[Quantizer]:
        return [part for stage in self.groups for part in stage.sub_quantizers]

    @property
    def spec(self) -> TokenSpec:
        return TokenSpec.concat([group.spec for group in self.groups])

    def _forward_flat(self, z: torch.Tensor, update: bool) -> QuantizerOutput:
        outs = [group._forward_flat(part, update) for group, part in zip(self.groups, z.split(self.group_dim, -1))]
        return QuantizerOutput(
            torch.cat([o.quantized for o in outs], dim=-1),
            torch.cat([o.codes for o in outs], dim=-1),
            torch.stack([o.loss for o in outs]).mean(),
            merge_metrics([o.metrics for o in outs]),
        )

    def _encode_flat(self, z: torch.Tensor) -> torch.Tensor:
        parts = z.split(self.group_dim, -1)
        return torch.cat([group._encode_flat(part) for group, part in zip(self.groups, parts)], dim=-1)

    def _decode_flat(self, codes: torch.Tensor) -> torch.Tensor:
        parts, start = [], 0
        for group in self.groups:
            width = group.spec.num_codebooks
            parts.append(group._decode_flat(codes[:, start : start + width]))
            start += width
        return torch.cat(parts, dim=-1)
