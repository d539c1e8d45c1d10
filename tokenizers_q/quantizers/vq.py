"""Vector quantization (van den Oord et al., VQ-VAE) on the shared :class:`Codebook`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenizers_q.checks import check_int
from tokenizers_q.codebook import Codebook
from tokenizers_q.packing import TokenSpec
from tokenizers_q.quantizers.base import (
    Quantizer,
    QuantizerOutput,
    projections,
    register_quantizer,
    straight_through,
)


def rotation_trick(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rotate-and-rescale ``e`` onto ``q`` (Fifty et al., 2024, "rotation trick").

    The forward value equals ``q``; the gradient flows to ``e`` through a rotation
    and scaling that are treated as constants, instead of the identity of the
    straight-through estimator.

    Shapes:
        - e, q: (N, D)
        - output: (N, D)
    """
    e_norm = e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    u = (e / e_norm).detach()
    v = (q / q_norm).detach()
    w = F.normalize(u + v, dim=-1).detach()
    # R e with R = I - 2 w w^T + 2 v u^T, the rotation taking u to v
    rotated = e - 2.0 * (e * w).sum(-1, keepdim=True) * w + 2.0 * (e * u).sum(-1, keepdim=True) * v
    return rotated * (q_norm / e_norm).detach()


@register_quantizer("vq")
class VQ(Quantizer):
    r"""Vector quantization against one codebook of ``codebook_size`` codes.

    Args:
        dim: size of the channel axis of the input.
        codebook_size: number of codes.
        codebook_dim: size of the code vectors; a linear projection maps ``dim``
            to it and back when they differ. Default: ``dim``.
        decay: EMA decay of the codebook statistics. Default: 0.99.
        ema_update: EMA codebook (True) or codes learned by gradient through the
            codebook loss (False). Default: True.
        kmeans_init: k-means initialisation on the first training batch. Default: True.
        kmeans_iters: Lloyd iterations of that initialisation. Default: 10.
        threshold_ema_dead_code: revive codes whose EMA cluster size falls below
            this (0: off). Default: 0.
        commitment_weight: weight of ``||z - sg(q)||^2``. Default: 0.25.
        codebook_weight: weight of ``||sg(z) - q||^2`` for learnable codes. Default: 1.
        use_cosine_sim: quantize unit-normalised vectors by cosine similarity. Default: False.
        rotation_trick: pass gradients with the rotation trick instead of the
            straight-through estimator. Default: False.
        channel_first: input is (B, dim, *spatial). Default: False.
        max_elements: memory budget (entries) of the distance computation (default: per device).

    Shapes:
        - input: (*, dim), or (B, dim, *spatial) with ``channel_first``
        - quantized: same as input; codes: (*, 1), int64
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        *,
        decay: float = 0.99,
        ema_update: bool = True,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 0.0,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        use_cosine_sim: bool = False,
        rotation_trick: bool = False,
        channel_first: bool = False,
        max_elements: int | None = None,
    ):
        super().__init__(dim, channel_first)
        codebook_dim = check_int("codebook_dim", codebook_dim if codebook_dim is not None else dim)
        if commitment_weight < 0 or codebook_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got commitment_weight={commitment_weight}, "
                f"codebook_weight={codebook_weight}"
            )
        self.project_in, self.project_out = projections(dim, codebook_dim)
        self.codebook = Codebook(
            codebook_dim,
            codebook_size,
            use_cosine_sim=use_cosine_sim,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            ema_update=ema_update,
            decay=decay,
            threshold_ema_dead_code=threshold_ema_dead_code,
            max_elements=max_elements,
        )
        self.codebook_size = codebook_size
        self.commitment_weight, self.codebook_weight = commitment_weight, codebook_weight
        self.use_cosine_sim, self.rotation_trick = use_cosine_sim, rotation_trick

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, rotation_trick={self.rotation_trick}"

    @property
    def spec(self) -> TokenSpec:
        return TokenSpec((self.codebook_size,), ((self.codebook_size,),))

    def _forward_flat(self, z: torch.Tensor, update: bool) -> QuantizerOutput:
        h = self.project_in(z).float()
        if self.use_cosine_sim:
            h = F.normalize(h, dim=-1)
        quantized, indices, metrics = self.codebook(h, update=update)
        loss = self.commitment_weight * F.mse_loss(h, quantized.detach())
        if not self.codebook.ema_update:
            loss = loss + self.codebook_weight * F.mse_loss(quantized, h.detach())
        q = quantized.detach()
        out = rotation_trick(h, q) if self.rotation_trick else straight_through(h, q)
        return QuantizerOutput(self.project_out(out), indices.unsqueeze(-1), loss, metrics)

    def _encode_flat(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project_in(z).float()
        return self.codebook.assign(F.normalize(h, dim=-1) if self.use_cosine_sim else h).unsqueeze(-1)

    def _decode_flat(self, codes: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.codebook.lookup(codes[:, 0]))
