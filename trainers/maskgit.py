"""MaskGIT (Chang et al., 2022): a bidirectional transformer that fills masked tokens in parallel."""

from __future__ import annotations

import math

import torch

from tokenizers_q.checks import check_int
from tokenizers_q.trainers.module import Step
from tokenizers_q.trainers.token_module import BITS_PER_NAT, TokenModule


def cosine_schedule(ratio: torch.Tensor | float) -> torch.Tensor | float:
    """Share of tokens still masked at progress ``ratio`` in [0, 1]: cos(pi / 2 * ratio)."""
    if isinstance(ratio, torch.Tensor):
        return torch.cos(ratio * math.pi / 2)
    return math.cos(ratio * math.pi / 2)


class MaskedTokenModule(TokenModule):
    r"""Masked token modelling with MaskGIT's cosine schedule and iterative parallel decoding.

    Training hides a cosine-distributed share of each example's tokens (all codebooks of
    a token together) and minimises the negative log-likelihood of the hidden tokens.
    Sampling starts from a fully masked grid and, over ``sample_steps`` steps, samples
    every hidden token, keeps the most confident ones and re-masks the rest, following
    the cosine schedule; confidences get Gumbel noise of scale ``choice_temperature``,
    annealed to zero over the steps.

    Args:
        sample_steps: decoding steps. Default: 8.
        temperature: sampling temperature of the tokens. Default: 1.0.
        choice_temperature: Gumbel noise on the confidences at the first step. Default: 4.5.
        **kwargs: see :class:`~tokenizers_q.trainers.token_module.TokenModule`.

    Logged: ``{stage}/loss`` (nats per masked token), ``{stage}/bits_per_masked_token``,
    ``{stage}/masked_accuracy`` (share of masked tokens predicted exactly, argmax).
    """

    def __init__(self, sample_steps: int = 8, temperature: float = 1.0, choice_temperature: float = 4.5, **kwargs):
        super().__init__(**kwargs)
        check_int("sample_steps", sample_steps)
        self.save_hyperparameters()

    def random_mask(self, batch: int) -> torch.Tensor:
        """(batch, L) bool: each row hides ceil(cos(pi/2 * u) * L) random tokens, u ~ U(0, 1), at least one."""
        length = self.seq_len
        count = (cosine_schedule(torch.rand(batch, device=self.device)) * length).ceil().clamp(1, length)
        ranks = torch.rand(batch, length, device=self.device).argsort(1).argsort(1)
        return ranks < count.unsqueeze(1)

    def losses(self, batch, stage: str) -> Step:
        codes, labels = self._batch(batch)
        mask = self.random_mask(codes.shape[0])
        hidden = self.transformer(codes, labels, mask=mask)[:, 1:]
        logits = self.transformer.logits(hidden)
        log_prob = self.transformer.log_prob(logits, codes)
        loss = -(log_prob * mask).sum() / mask.sum()
        with torch.no_grad():
            predicted = self.transformer.sample(logits, temperature=0)
            correct = (predicted == codes).all(-1)
            accuracy = (correct & mask).sum() / mask.sum()
        return Step({"loss": loss, "bits_per_masked_token": loss.detach() * BITS_PER_NAT, "masked_accuracy": accuracy})

    @torch.no_grad()
    def generate(
        self,
        num: int,
        labels: torch.Tensor | None = None,
        steps: int | None = None,
        temperature: float | None = None,
        choice_temperature: float | None = None,
    ) -> torch.Tensor:
        """Decode ``num`` token grids from all-masked in ``steps`` forward passes.

        Shapes:
            - labels: (num,) classes or None
            - output: (num, *grid, num_codebooks)
        """
        hp = self.hparams
        steps = hp.sample_steps if steps is None else steps
        temperature = hp.temperature if temperature is None else temperature
        choice_temperature = hp.choice_temperature if choice_temperature is None else choice_temperature
        check_int("steps", steps)
        labels = self._labels(labels)
        length, spec = self.seq_len, self.transformer.spec
        codes = torch.zeros(num, length, spec.num_codebooks, dtype=torch.long, device=self.device)
        masked = torch.ones(num, length, dtype=torch.bool, device=self.device)
        for step in range(steps):
            logits = self.transformer.logits(self.transformer(codes, labels, mask=masked)[:, 1:])
            sampled = self.transformer.sample(logits, temperature)
            confidence = self.transformer.log_prob(logits, sampled)
            sampled = torch.where(masked.unsqueeze(-1), sampled, codes)
            # tokens fixed before stay fixed: they can never be re-masked
            confidence = torch.where(masked, confidence, torch.full_like(confidence, float("inf")))
            keep_masked = math.floor(cosine_schedule((step + 1) / steps) * length)
            still_masked = masked.sum(1, keepdim=True)
            keep_masked = torch.minimum(torch.full_like(still_masked, keep_masked), still_masked - 1).clamp_min(0)
            noise = choice_temperature * (1.0 - (step + 1) / steps)
            if noise > 0:
                gumbel = -torch.log(-torch.log(torch.rand_like(confidence).clamp(1e-20, 1.0)).clamp_min(1e-20))
                confidence = confidence + noise * gumbel
            ranks = confidence.argsort(1).argsort(1)
            masked = ranks < keep_masked
            codes = sampled
        return self._grid(codes)
