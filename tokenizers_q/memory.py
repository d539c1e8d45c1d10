"""What an object holds, and the one bit-accounting protocol of the library.

Every object that holds compressed data reports ``stored_bits()``: the bits of what it keeps
(packed codes, scales, its own float parts), which :func:`held_bytes` checks against the process's
real storages. Tables shared by many such objects (a quantizer's codebooks and projections) are
counted once, by :func:`shared_bits`, in the dtype they are stored in. Each application derives one
rate from these: ``bits_per_element()`` (KV caches), ``bits_per_weight()`` (quantized layers),
``bits_per_vector()`` (embedding codecs), ``bits_per_image(shape)`` (image tokenizers),
``bits_per_node()`` (graph tokenizers) and ``TokenSpec.bits_per_token`` (a token layout).
"""

from __future__ import annotations

import torch


def shared_bits(module: torch.nn.Module) -> int:
    """Bits of the tables a quantizer (or any module holding one) shares between everything it codes: its
    parameters and its codebooks (``Quantizer.codebooks()`` of every quantizer inside), each tensor counted once
    in its stored dtype; training statistics (EMA sums, usage counts) are not needed to decode and not counted."""
    from tokenizers_q.quantizers import Quantizer

    tensors = {id(t): t for t in module.parameters()}
    for quantizer in (m for m in module.modules() if isinstance(m, Quantizer)):
        tensors.update((id(t), t) for t in quantizer.codebooks())
    return sum(8 * t.numel() * t.element_size() for t in tensors.values())


def held_bytes(obj, seen: set | None = None) -> int:
    """Bytes of every distinct tensor storage reachable from ``obj`` through attributes (modules' parameters,
    buffers and tensor attributes included), lists, tuples and dicts: what it keeps alive, spare room of
    growing buffers included. Wrapper tensor subclasses (quantized tensors) count their inner tensors.

    Args:
        seen: storages and objects already counted (pass one set over several calls to leave out what an
            earlier object holds, e.g. codebooks shared by many caches).
    """
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if flatten is not None and type(obj) not in (torch.Tensor, torch.nn.Parameter):
            return sum(held_bytes(getattr(obj, name), seen) for name in flatten()[0])
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if id(obj) in seen or isinstance(obj, (type, str, bytes, int, float, bool)) or obj is None:
        return 0
    seen.add(id(obj))
    if isinstance(obj, dict):
        return sum(held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(held_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(held_bytes(v, seen) for v in vars(obj).values())
    return 0
