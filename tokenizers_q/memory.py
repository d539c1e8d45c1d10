"""What an object holds: the bytes of every tensor storage it keeps alive (the measure of compression)."""

from __future__ import annotations

import torch


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
