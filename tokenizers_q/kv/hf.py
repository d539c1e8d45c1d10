"""Hugging Face transformers adapter: any library KV cache as a ``transformers`` ``Cache``.

Needs the optional extra ``hf`` (``pip install "tokenizers_q[hf]"``)::

    from tokenizers_q.kv import KIVIConfig
    from tokenizers_q.kv.hf import hf_cache

    cache = hf_cache(model.config.num_hidden_layers, KIVIConfig(key_bits=2, value_bits=2).make_layer)
    model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
    cache.bits_per_element()    # every stored bit, over all layers
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from tokenizers_q.kv.cache import FullPrecisionLayerCache, LayerCache, total_bits_per_element


class HFCacheLayer(CacheLayerMixin):
    """One attention layer of a ``transformers`` model, stored by a library :class:`LayerCache`."""

    is_sliding = False

    def __init__(self, inner: LayerCache):
        super().__init__()
        self.inner = inner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype, self.is_initialized = key_states.device, key_states.dtype, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.inner.update(key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.inner.num_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("library KV caches are append-only: make a new cache with hf_cache")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("library KV caches are append-only: beam search is not supported")


class HFKVCache(Cache):
    """A ``transformers`` ``Cache`` whose layers are library caches; adds :meth:`bits_per_element`."""

    def bits_per_element(self) -> float:
        return total_bits_per_element(layer.inner for layer in self.layers)


def hf_rotary(model) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The rotary tables of a ``transformers`` decoder with RoPE (Llama, Mistral, Qwen, ...), for
    :class:`~tokenizers_q.kv.rope.PreRoPELayerCache`: ``positions -> (cos, sin)``, each (T, head_dim)."""
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"{type(model).__name__} has no rotary embedding (model.model.rotary_emb)")

    def tables(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probe = torch.zeros(1, device=positions.device)
        cos, sin = rotary(probe, positions[None])
        return cos[0], sin[0]

    return tables


def hf_cache(
    layers: int | Sequence[LayerCache], make_layer: Callable[[], LayerCache] = FullPrecisionLayerCache
) -> HFKVCache:
    """An empty ``transformers`` cache for ``past_key_values=``: ``layers`` library layer caches made by
    ``make_layer``, or the given layer caches in layer order (e.g. ``KVTokenizerModule.layer_caches``)."""
    if isinstance(layers, Sequence):
        if not layers or not all(isinstance(layer, LayerCache) for layer in layers):
            raise ValueError(f"layers must be a non-empty sequence of LayerCache, got {layers!r}")
        return HFKVCache(layers=[HFCacheLayer(layer) for layer in layers])
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ValueError(f"layers must be a positive int or a sequence of LayerCache, got {layers!r}")
    return HFKVCache(layers=[HFCacheLayer(make_layer()) for _ in range(layers)])
