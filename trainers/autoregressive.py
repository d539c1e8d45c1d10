"""Autoregressive next-token model over token grids in raster order, with a KV cache for sampling."""

from __future__ import annotations

import torch

from tokenizers_q.checks import check_int
from tokenizers_q.kv import KVCache
from tokenizers_q.trainers.module import Step
from tokenizers_q.trainers.token_module import BITS_PER_NAT, TokenModule


class AutoregressiveTokenModule(TokenModule):
    r"""Next-token prediction in raster order (all codebooks of a token predicted together).

    Args:
        temperature: sampling temperature (0: greedy). Default: 1.0.
        top_k: sample among the k most likely values of each head (0: all). Default: 0.
        **kwargs: see :class:`~tokenizers_q.trainers.token_module.TokenModule`.

    Logged: ``{stage}/loss`` (nats per token), ``{stage}/bits_per_token`` and
    ``{stage}/bits_per_image`` (held-out negative log-likelihood, the code length an
    entropy coder driven by this model would reach).
    """

    def __init__(self, temperature: float = 1.0, top_k: int = 0, **kwargs):
        super().__init__(**kwargs)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        check_int("top_k", top_k, minimum=0)
        self.save_hyperparameters()

    def nll(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Negative log-likelihood (nats) of each example's tokens. Shapes: (B, L, C) -> (B, L)."""
        hidden = self.transformer(codes[:, :-1], labels, causal=True)
        return -self.transformer.log_prob(self.transformer.logits(hidden), codes)

    def losses(self, batch, stage: str) -> Step:
        codes, labels = self._batch(batch)
        loss = self.nll(codes, labels).mean()
        bits = loss.detach() * BITS_PER_NAT
        return Step({"loss": loss, "bits_per_token": bits, "bits_per_image": bits * self.seq_len})

    @torch.no_grad()
    def generate(
        self,
        num: int,
        labels: torch.Tensor | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        use_cache: bool = True,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Sample ``num`` token grids one token at a time (``temperature=0``: greedy).

        With ``use_cache`` each step feeds only the newest token and reuses the keys and
        values of the earlier ones; without, each step reruns the whole prefix. ``cache``:
        an empty :class:`~tokenizers_q.kv.KVCache` to use, e.g. ``KVCache(KIVIConfig(bits...).make_layer)``
        for compressed keys and values (default: full precision).

        Shapes:
            - labels: (num,) classes or None
            - output: (num, *grid, num_codebooks)
        """
        temperature = self.hparams.temperature if temperature is None else temperature
        top_k = self.hparams.top_k if top_k is None else top_k
        labels = self._labels(labels)
        model = self.transformer
        if cache is not None and (not use_cache or cache.num_tokens):
            raise ValueError("cache must be an empty KVCache, and use_cache True")
        cache = (KVCache() if cache is None else cache) if use_cache else None
        hidden = model(None, labels, causal=True, cache=cache, batch_size=num)
        tokens = [model.sample(model.logits(hidden[:, -1:]), temperature, top_k)]
        for i in range(1, self.seq_len):
            if use_cache:
                hidden = model(tokens[-1], causal=True, cache=cache, start=i - 1)
            else:
                hidden = model(torch.cat(tokens, 1), labels, causal=True)
            tokens.append(model.sample(model.logits(hidden[:, -1:]), temperature, top_k))
        return self._grid(torch.cat(tokens, 1))
