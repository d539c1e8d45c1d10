"""Lookup-free (LFQ, Yu et al. MAGVIT-v2) and binary spherical quantization (BSQ, Zhao et al. 2024).

Each channel is quantized to one bit, so a code of ``L`` channels indexes an
implicit codebook of ``2^L`` entries that is never materialised. The entropy
regulariser is computed in factorised form: the soft assignment over the
``2^L`` codes is a product of per-bit Bernoulli distributions, so

- the per-sample entropy is the sum of per-bit entropies (exact), and
- the codebook entropy (of the batch-averaged assignment) is computed exactly
  within groups of bits (``log p(c | h) = sum_i logsigmoid(-l_i) + <bits(c), l>``
  over the ``2^g`` codes of a group of ``g`` bits, memory ``O(N * 2^g)``) and
  summed over the groups: exact for one group of all ``L`` bits, the per-bit
  marginals' entropies for groups of one bit, and in between the group-factorised
  estimate of BSQ-ViT and MaskBit. Every split bounds the exact entropy from
  above; it sees correlations within a group and none across groups, so per-bit
  groups let balanced but correlated bits collapse onto a few codes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokenizers_q.checks import check_choice
from tokenizers_q.metrics import code_counts, usage_metrics
from tokenizers_q.packing import MAX_BITS, TokenSpec
from tokenizers_q.quantizers.base import Quantizer, QuantizerOutput, projections, register_quantizer, straight_through


def binary_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of Bernoulli(sigmoid(logits)), elementwise and numerically stable."""
    return F.binary_cross_entropy_with_logits(logits, torch.sigmoid(logits), reduction="none")


def code_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The ``bits`` bits of each code, least significant first. Shapes: codes (..., 1) int -> (..., bits) int."""
    return (codes >> torch.arange(bits, device=codes.device)) & 1


CODEBOOK_ENTROPIES = ("auto", "exact", "grouped", "factorised")
ENTROPY_GROUP_MAX_BITS = 12
LOG_PROB_FLOOR = -80.0  # e^-80 ~ 1.8e-35: still a normal float32


def entropy_groups(bits: int, mode: str) -> tuple[int, ...]:
    """Sizes of the groups of bits whose codebook entropies are exact and summed.

    ``"exact"``: one group; ``"factorised"``: one bit a group; ``"grouped"``: the
    fewest groups of at most 12 bits, as equal as possible; ``"auto"``: exact up
    to 12 bits, grouped above.
    """
    check_choice("codebook_entropy", mode, CODEBOOK_ENTROPIES)
    if mode == "exact" or (mode == "auto" and bits <= ENTROPY_GROUP_MAX_BITS):
        return (bits,)
    if mode == "factorised":
        return (1,) * bits
    count = -(-bits // ENTROPY_GROUP_MAX_BITS)
    return tuple(bits // count + (i < bits % count) for i in range(count))


@register_quantizer("lfq")
class LFQ(Quantizer):
    r"""Lookup-free quantization: each channel becomes ``sign(z) * scale``.

    Args:
        dim: size of the channel axis. Default: ``log2(codebook_size)``.
        codebook_size: ``2^L``; ``L`` channels are quantized (projected from
            ``dim`` when different). Default: ``2^dim``.
        entropy_loss_weight: weight of the entropy regulariser. Default: 0.1.
        commitment_weight: weight of ``||z - sg(q)||^2``. Default: 0.25.
        diversity_gamma: weight of the codebook-entropy term inside the
            regulariser (per-sample entropy - gamma * codebook entropy). Default: 1.
        inv_temperature: sharpness of the soft assignment used by the
            regulariser. Default: 100.
        codebook_entropy: ``"exact"`` (over all codes), ``"grouped"`` (exact within
            the fewest groups of at most 12 bits, summed), ``"factorised"`` (per-bit
            marginals) or ``"auto"``: exact up to 2^12 codes, grouped above. Default: ``"auto"``.
        channel_first: input is (B, dim, *spatial). Default: False.

    Shapes:
        - input: (*, dim), or (B, dim, *spatial) with ``channel_first``
        - quantized: same as input; codes: (*, 1), int64 in [0, codebook_size)
    """

    spherical = False

    def __init__(
        self,
        dim: int | None = None,
        codebook_size: int | None = None,
        *,
        entropy_loss_weight: float = 0.1,
        commitment_weight: float = 0.25,
        diversity_gamma: float = 1.0,
        inv_temperature: float = 100.0,
        codebook_entropy: str = "auto",
        channel_first: bool = False,
    ):
        name = type(self).__name__
        if codebook_size is None and dim is None:
            raise ValueError(f"{name} needs dim or codebook_size")
        if codebook_size is not None:
            if not isinstance(codebook_size, int) or codebook_size < 2 or codebook_size & (codebook_size - 1):
                raise ValueError(f"{name} codebook_size must be a power of 2 >= 2, got {codebook_size!r}")
            bits = codebook_size.bit_length() - 1
        else:
            bits = dim
        if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
            raise ValueError(f"{name} supports 1 to {MAX_BITS} bits, got {bits!r}")
        super().__init__(dim if dim is not None else bits, channel_first)
        if min(entropy_loss_weight, commitment_weight) < 0 or inv_temperature <= 0:
            raise ValueError(
                f"loss weights must be >= 0 and inv_temperature > 0, got "
                f"entropy_loss_weight={entropy_loss_weight}, commitment_weight={commitment_weight}, "
                f"inv_temperature={inv_temperature}"
            )
        self.bits, self.codebook_size = bits, 2**bits
        self.entropy_groups = entropy_groups(bits, codebook_entropy)
        self.entropy_loss_weight, self.commitment_weight = entropy_loss_weight, commitment_weight
        self.diversity_gamma, self.inv_temperature = diversity_gamma, inv_temperature
        self.scale = 1.0 / math.sqrt(bits) if self.spherical else 1.0
        self.project_in, self.project_out = projections(self.dim, bits)
        self.register_buffer("_powers", 2 ** torch.arange(bits, dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bits={self.bits}, codebook_size=2**{self.bits}, entropy_groups={self.entropy_groups}"

    @property
    def spec(self) -> TokenSpec:
        return TokenSpec((self.codebook_size,), ((2,) * self.bits,))

    def _forward_flat(self, z: torch.Tensor, update: bool) -> QuantizerOutput:
        h = self.project_in(z).float()
        if self.spherical:
            h = F.normalize(h, dim=-1)
        positive = h > 0
        q = torch.where(positive, self.scale, -self.scale)
        out = straight_through(h, q)
        codes = (positive.long() * self._powers).sum(-1, keepdim=True)
        # soft assignment: p(bit = 1 | h) = sigmoid(4 * tau * scale * h), i.e. a softmax over
        # the 2^L codes of 2 * tau * <h, c> that factorises over bits
        logits = 4.0 * self.inv_temperature * self.scale * h
        per_sample, codebook_entropy = self._entropies(logits)
        entropy_loss = per_sample - self.diversity_gamma * codebook_entropy
        loss = self.commitment_weight * F.mse_loss(h, q) + self.entropy_loss_weight * entropy_loss
        metrics = usage_metrics(code_counts(codes, self.codebook_size))
        metrics["per_sample_entropy"] = per_sample.detach()
        metrics["codebook_entropy"] = codebook_entropy.detach()
        return QuantizerOutput(self.project_out(out), codes, loss, metrics)

    def _entropies(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean per-sample entropy and codebook entropy, in float32 also under autocast; zero for no rows.

        Shapes: logits (N, L) float32 -> two () scalars.
        """
        if not logits.shape[0]:
            return logits.new_zeros(()), logits.new_zeros(())
        with torch.autocast(logits.device.type, enabled=False):  # a bf16 matmul of 2^L codes loses the entropy
            return binary_entropy_from_logits(logits).sum(-1).mean(), self._codebook_entropy(logits)

    def _codebook_entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """Entropy of the batch-averaged soft assignment, exact within each group of bits and summed.

        Shapes: logits (N, L) -> () scalar.
        """
        total = logits.new_zeros(())
        for group in logits.split(self.entropy_groups, dim=-1):
            bits = group.shape[-1]
            all_bits = code_bits(torch.arange(2**bits, device=logits.device).unsqueeze(1), bits)
            log_p = F.logsigmoid(-group).sum(-1, keepdim=True) + group @ all_bits.float().T  # (N, 2^g), <= 0
            # below e^-80 a probability adds nothing to the mean; the clamp keeps exp() off subnormal floats,
            # which are ~30x slower on CPUs
            mean_prob = log_p.clamp_min(LOG_PROB_FLOOR).exp().mean(0)
            total = total - (mean_prob * mean_prob.log()).sum()
        return total

    def _decode_flat(self, codes: torch.Tensor) -> torch.Tensor:
        bits = code_bits(codes, self.bits)
        return self.project_out(torch.where(bits.bool(), self.scale, -self.scale))


@register_quantizer("bsq")
class BSQ(LFQ):
    r"""Binary spherical quantization: LFQ on the unit sphere.

    The projected vector is unit-normalised and each channel quantized to
    ``sign / sqrt(L)``, so every code lies on the unit sphere and the
    quantization error is bounded. Same arguments as :class:`LFQ`.

    Shapes:
        - input: (*, dim), or (B, dim, *spatial) with ``channel_first``
        - quantized: same as input; codes: (*, 1), int64 in [0, codebook_size)
    """

    spherical = True
