"""A learned codec for attention keys or values: linear encoder -> any library quantizer -> linear decoder."""

from __future__ import annotations

import torch
from torch import nn

from tokenizers_q.packing import TokenSpec
from tokenizers_q.quantizers import Quantizer, QuantizerOutput, create_quantizer


class KVCodec(Quantizer):
    r"""Per-head key or value vectors as the codes of a library quantizer between two learned linear maps.

    Both maps start as the identity, so an untrained codec is its quantizer (k-means
    initialised on the first training batch); training with an attention-output loss
    (:class:`~tokenizers_q.trainers.KVTokenizerModule`) moves the encoder through the
    straight-through gradient and the decoder directly, towards the directions that
    attention reads. A :class:`~tokenizers_q.quantizers.Quantizer`, so
    :class:`~tokenizers_q.kv.QuantizerLayerCache` stores it like any other.

    Args:
        head_dim: size of a key or value vector.
        quantizer: registered quantizer name (``"rvq"``, ``"vq"``, ``"pq"``, ``"fsq"``, ...). Default: ``"rvq"``.
        quantizer_kwargs: its arguments (``dim`` is ``head_dim``). Default: 16 levels of 256 codes
            (2 bits per element at ``head_dim`` 64).

    Shapes:
        - input: (..., head_dim); codes: (..., num_codebooks) int64
    """

    def __init__(self, head_dim: int, quantizer: str = "rvq", quantizer_kwargs: dict | None = None):
        super().__init__(head_dim)
        kwargs = {"num_quantizers": 16, "codebook_size": 256} if quantizer_kwargs is None else dict(quantizer_kwargs)
        self.quantizer = create_quantizer(quantizer, dim=head_dim, **kwargs)
        self.encoder, self.decoder = nn.Linear(head_dim, head_dim), nn.Linear(head_dim, head_dim)
        for linear in (self.encoder, self.decoder):
            nn.init.eye_(linear.weight)
            nn.init.zeros_(linear.bias)

    @property
    def spec(self) -> TokenSpec:
        return self.quantizer.spec

    # the inner quantizer is read through its public contract (flat rows in, flat rows out); it updates its
    # statistics in training mode, which it shares with this codec
    def _forward_flat(self, z: torch.Tensor, update: bool) -> QuantizerOutput:
        out = self.quantizer(self.encoder(z))
        return QuantizerOutput(self.decoder(out.quantized), out.codes, out.loss, out.metrics)

    def _encode_flat(self, z: torch.Tensor) -> torch.Tensor:
        return self.quantizer.encode(self.encoder(z))  # no state changes, in training mode too

    def _decode_flat(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantizer.decode(codes))
