"""Attention inputs of a causal LM (queries, keys, values before RoPE, optionally their Fisher information):
what KV-cache quantizers calibrate on (CQ's Fisher-weighted k-means) and what KV tokenizers train on.

``collect_attention_inputs`` runs a ``transformers`` decoder with rotary embeddings (Llama, Mistral, Qwen,
SmolLM, ...) over token sequences and records what each attention layer projects. It needs the optional
extra ``hf`` (imported when called); this module imports neither ``transformers`` nor ``lightning``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tokenizers_q.files import read_artifact, write_artifact

ACTIVATIONS = ("queries", "keys", "values")
FORMAT = "tokenizers_q.attention_inputs"  # the artifact collect_attention_inputs writes
VERSION = 1


def attention_layers(model) -> list:
    """The decoder layers of a ``transformers`` causal LM, each with a ``self_attn`` projecting through ``q_proj``,
    ``k_proj`` and ``v_proj`` (Llama, Mistral, Qwen, SmolLM, ...)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    projections = ("q_proj", "k_proj", "v_proj")
    if layers is None or not all(
        all(hasattr(getattr(layer, "self_attn", None), p) for p in projections) for layer in layers
    ):
        raise ValueError(
            f"{type(model).__name__} has no decoder layers whose self_attn has q_proj, k_proj, v_proj "
            "(model.model.layers)"
        )
    return list(layers)


def model_head_dim(model) -> int:
    """The attention head size of a ``transformers`` model (its config's ``head_dim``, else hidden / heads)."""
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def collect_attention_inputs(
    model, sequences: list[torch.Tensor], path: str | Path | None = None, fisher: bool = False
) -> dict:
    """Pre-RoPE queries and keys, values and the rotary tables of every layer over ``sequences``.

    Every sequence must have the same length T. With ``fisher`` also the diagonal Fisher
    information of each key and value vector (the squared gradient of the language-model
    loss, summed over channels), as weights for k-means (CQ). With ``path`` the result is also
    written there (an artifact, atomically; :func:`read_attention_inputs` reads it back).

    Shapes:
        - sequences: each (T,) token ids
        - queries: (S, L, H_q, T, D) float16; keys, values: (S, L, H_kv, T, D) float16
        - key_fisher, value_fisher (with ``fisher``): (S, L, H_kv, T) float32
        - cos, sin: (T, D) float32, the rotary angles of positions 0..T-1
    """
    if not sequences or any(s.dim() != 1 or len(s) != len(sequences[0]) for s in sequences):
        raise ValueError(f"expected token sequences (T,) of one length, got {[tuple(s.shape) for s in sequences]}")
    layers = attention_layers(model)
    head_dim = model_head_dim(model)
    names = ACTIVATIONS + (("key_fisher", "value_fisher") if fisher else ())
    recorded: dict[str, list[list[torch.Tensor]]] = {name: [[] for _ in layers] for name in names}

    def heads(x: torch.Tensor) -> torch.Tensor:  # (B, T, H * D) -> (B, H, T, D)
        return x.reshape(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)

    def hook(name: str, index: int):
        def keep(module, args, output):
            recorded[name][index].append(heads(output.detach()).to(torch.float16).cpu())
            if fisher and name != "queries":
                store = recorded[f"{name[:-1]}_fisher"][index]
                output.register_hook(lambda grad: store.append(heads(grad).float().pow(2).sum(-1).cpu()))

        return keep

    handles = [
        getattr(layer.self_attn, projection).register_forward_hook(hook(name, i))
        for i, layer in enumerate(layers)
        for name, projection in zip(ACTIVATIONS, ("q_proj", "k_proj", "v_proj"))
    ]
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        for ids in sequences:
            ids = ids[None].to(model.device)
            if not fisher:
                with torch.no_grad():
                    model(ids, use_cache=False)
                continue
            embeddings = model.get_input_embeddings()(ids).detach().requires_grad_()
            model(inputs_embeds=embeddings, labels=ids, use_cache=False).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(True)
    from tokenizers_q.kv.hf import hf_rotary  # transformers: the optional extra hf

    with torch.no_grad():
        cos, sin = hf_rotary(model)(torch.arange(len(sequences[0]), device=model.device))
    data = {name: torch.stack([torch.cat(per_layer) for per_layer in recorded[name]], 1) for name in names}
    data.update(cos=cos.float().cpu(), sin=sin.float().cpu())
    if path is not None:
        write_artifact(path, FORMAT, VERSION, {"num_sequences": len(sequences)}, data)
    return data


def check_attention_inputs(data: dict, source: str = "the activations") -> None:
    """Raise a clear error unless ``data`` has consistent queries, keys, values, cos and sin."""
    missing = [k for k in (*ACTIVATIONS, "cos", "sin") if k not in data]
    if missing:
        raise ValueError(f"{source} lack {missing}; make them with collect_attention_inputs")
    queries, keys, values = (data[k] for k in ACTIVATIONS)
    same_layout = queries.shape[:2] + queries.shape[3:] == keys.shape[:2] + keys.shape[3:]
    if queries.dim() != 5 or keys.shape != values.shape or not same_layout:
        raise ValueError(
            f"{source}: expected queries (S, L, H_q, T, D) and keys = values (S, L, H_kv, T, D), "
            f"got {tuple(queries.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}"
        )
    if queries.shape[2] % keys.shape[2]:
        raise ValueError(f"{source}: {queries.shape[2]} query heads are not a multiple of {keys.shape[2]} key heads")
    if data["cos"].shape != (queries.shape[3], queries.shape[4]) or data["sin"].shape != data["cos"].shape:
        raise ValueError(f"{source}: cos and sin must be (T, D) = {tuple(queries.shape[3:])}")


def read_attention_inputs(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The attention inputs :func:`collect_attention_inputs` saved to ``path``, verified (checksums, layout)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no attention activations at {path}")
    data = read_artifact(path, FORMAT, VERSION).tensors
    check_attention_inputs(data, str(path))
    return data
