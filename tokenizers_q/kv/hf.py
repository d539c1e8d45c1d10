"""Hugging Face transformers adapter: any library KV cache as a ``transformers`` ``Cache``.

Needs the optional extra ``hf`` (``pip install "tokenizers_q[hf]"``)::

    from tokenizers_q.kv import KIVIConfig
    from tokenizers_q.kv.hf import hf_cache

    cache = hf_cache(model.config.num_hidden_layers, KIVIConfig(key_bits=2, value_bits=2).make_layer)
    model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
    cache.bits_per_element()    # every stored bit, over all layers

    use_code_attention(model)   # attention reads the codes: no layer's keys and values are made
    cache = hf_cache(model.config.num_hidden_layers, KIVIConfig().make_layer, attend_from_codes=True)
    model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tokenizers_q.kv.cache import FullPrecisionLayerCache, LayerCache, total_bits_per_element

#: the name of the library's attention in transformers' attention interface
CODE_ATTENTION = "tokenizers_q"


class CodesInCache(torch.Tensor):
    """What a layer that attends from its codes hands the model instead of keys and values: a placeholder
    naming the cache layer. Any torch operation on it raises: only :func:`code_attention` reads it."""

    @staticmethod
    def __new__(cls, layer: LayerCache):
        placeholder = torch.Tensor._make_subclass(cls, torch.empty(0))
        placeholder.layer = layer
        return placeholder

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise TypeError(
            f"{getattr(func, '__name__', func)} got the codes of a KV cache made with attend_from_codes=True, "
            f"not keys and values: call use_code_attention(model) so that attention reads the codes"
        )


def code_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function of :data:`CODE_ATTENTION`: :meth:`LayerCache.attend` of the layer's
    cache when it holds codes (:class:`CodesInCache`), else torch's scaled dot-product attention.

    Shapes:
        - query: (B, Hq, Tq, D); attention_mask: bool (B, 1, Tq, T) or None (causal, or one query)
        - output: (B, Tq, Hq, D)
    """
    if not isinstance(key, CodesInCache):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    layer, count = key.layer, query.shape[2]
    mask = attention_mask
    if mask is None and count > 1:  # the new tokens see every earlier one and themselves
        positions = torch.arange(layer.num_tokens, device=query.device)
        mask = positions[None] <= positions[-count:, None]
    elif mask is not None:
        mask = mask[..., : layer.num_tokens]
    return layer.attend(query, scaling, mask).transpose(1, 2).contiguous(), None


def use_code_attention(model) -> None:
    """Make a transformers model attend through :func:`code_attention` (registered, with torch's boolean
    masks, as :data:`CODE_ATTENTION`): layers of a cache made with ``attend_from_codes=True`` read their
    codes, any other cache attends as with ``sdpa``."""
    AttentionInterface.register(CODE_ATTENTION, code_attention)
    AttentionMaskInterface.register(CODE_ATTENTION, sdpa_mask)
    model.set_attn_implementation(CODE_ATTENTION)


class HFCacheLayer(CacheLayerMixin):
    """One attention layer of a ``transformers`` model, stored by a library :class:`LayerCache`."""

    is_sliding = False

    def __init__(self, inner: LayerCache, attend_from_codes: bool = False):
        super().__init__()
        self.inner, self.attend_from_codes = inner, attend_from_codes

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype, self.is_initialized = key_states.device, key_states.dtype, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.attend_from_codes:
            self.inner.append(key_states, value_states)
            return CodesInCache(self.inner), CodesInCache(self.inner)
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
    layers: int | Sequence[LayerCache],
    make_layer: Callable[[], LayerCache] = FullPrecisionLayerCache,
    attend_from_codes: bool = False,
) -> HFKVCache:
    """An empty ``transformers`` cache for ``past_key_values=``: ``layers`` library layer caches made by
    ``make_layer``, or the given layer caches in layer order (e.g. ``KVTokenizerModule.layer_caches``).

    Args:
        attend_from_codes: layers hand the model their codes, not keys and values, for a model made to
            attend through them by :func:`use_code_attention`. Default: False.
    """
    if isinstance(layers, Sequence):
        if not layers or not all(isinstance(layer, LayerCache) for layer in layers):
            raise ValueError(f"layers must be a non-empty sequence of LayerCache, got {layers!r}")
        return HFKVCache(layers=[HFCacheLayer(layer, attend_from_codes) for layer in layers])
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ValueError(f"layers must be a positive int or a sequence of LayerCache, got {layers!r}")
    return HFKVCache(layers=[HFCacheLayer(make_layer(), attend_from_codes) for _ in range(layers)])
