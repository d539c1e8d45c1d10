"""Attention activations of a causal LM (queries, keys, values before RoPE) for training KV tokenizers.

``collect_attention_inputs`` runs a ``transformers`` decoder with rotary embeddings
(Llama, Mistral, Qwen, SmolLM, ...) over token sequences and records what each
attention layer projects; :class:`KVActivationDataModule` serves windows of it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from tokenizers_q.files import read_artifact, write_artifact
from tokenizers_q.kv.hf import hf_rotary
from tokenizers_q.trainers.data import SplitDataModule

ACTIVATIONS = ("queries", "keys", "values")
FORMAT = "tokenizers_q.attention_inputs"  # the artifact collect_attention_inputs writes
VERSION = 1


def collect_attention_inputs(
    model, sequences: list[torch.Tensor], path: str | Path | None = None, fisher: bool = False
) -> dict:
    """Pre-RoPE queries and keys, values and the rotary tables of every layer over ``sequences``.

    Every sequence must have the same length T. With ``fisher`` also the diagonal Fisher
    information of each key and value vector (the squared gradient of the language-model
    loss, summed over channels), as weights for k-means (CQ). With ``path`` the result is also
    written there (an artifact, atomically) for :class:`KVActivationDataModule`.

    Shapes:
        - sequences: each (T,) token ids
        - queries: (S, L, H_q, T, D) float16; keys, values: (S, L, H_kv, T, D) float16
        - key_fisher, value_fisher (with ``fisher``): (S, L, H_kv, T) float32
        - cos, sin: (T, D) float32, the rotary angles of positions 0..T-1
    """
    if not sequences or any(s.dim() != 1 or len(s) != len(sequences[0]) for s in sequences):
        raise ValueError(f"expected token sequences (T,) of one length, got {[tuple(s.shape) for s in sequences]}")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"{type(model).__name__} has no decoder layers with self_attn (model.model.layers)")
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
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


class AttentionWindows(Dataset):
    """Non-overlapping windows of ``window`` tokens of some sequences; each item holds every layer.

    Shapes (one item):
        - queries: (L, H_q, W, D); keys, values: (L, H_kv, W, D), float32
        - cos, sin: (W, D) of the window's positions
    """

    def __init__(self, data: dict, sequences: list[int], window: int):
        self.data, self.window = data, window
        starts = range(0, data["keys"].shape[3] - window + 1, window)
        self.items = [(s, t) for s in sequences for t in starts]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sequence, start = self.items[index]
        span = slice(start, start + self.window)
        item = {name: self.data[name][sequence, :, :, span].float() for name in ACTIVATIONS}
        item.update(cos=self.data["cos"][span], sin=self.data["sin"][span])
        return item


class KVActivationDataModule(SplitDataModule):
    r"""Windows of recorded attention activations; the last ``val_sequences`` sequences validate.

    Args:
        source: a dict from :func:`collect_attention_inputs` or the path it was saved to.
        window: tokens per item (causal attention within the window). Default: 128.
        val_sequences: sequences held out for validation. Default: 1.
        batch_size, num_workers, seed: loading. Defaults: 4, 0, 0.
    """

    item_name = "sequences"

    def __init__(
        self,
        source: dict | str | Path,
        window: int = 128,
        val_sequences: int = 1,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"no attention activations at {path}")
            source = read_artifact(path, FORMAT, VERSION).tensors
            check_attention_inputs(source, str(path))
        else:
            check_attention_inputs(source)
        num_sequences, tokens = source["keys"].shape[0], source["keys"].shape[3]
        if not isinstance(window, int) or not 1 <= window <= tokens:
            raise ValueError(f"window must be an int in [1, {tokens}] (tokens per sequence), got {window!r}")
        if not isinstance(val_sequences, int) or not 0 <= val_sequences < num_sequences:
            raise ValueError(f"val_sequences must be an int in [0, {num_sequences}), got {val_sequences!r}")
        self.data, self.window, self.val_sequences = source, window, val_sequences
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.splits = {}

    @property
    def layout(self) -> dict[str, int]:
        """num_layers, query_heads, kv_heads and head_dim of the recorded model."""
        _, layers, query_heads, _, dim = self.data["queries"].shape
        kv_heads = self.data["keys"].shape[2]
        return {"num_layers": layers, "query_heads": query_heads, "kv_heads": kv_heads, "head_dim": dim}

    def activations(self, split: str = "train") -> dict:
        """The recorded activations of one split's sequences (e.g. for ``KVTokenizerModule.calibrate``)."""
        self.setup()
        if split not in self.splits:
            raise ValueError(f"no {split} sequences: choose from {sorted(self.splits)}")
        sequences = sorted({s for s, _ in self.splits[split].items})
        return {k: v if k in ("cos", "sin") else v[sequences] for k, v in self.data.items()}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        total = self.data["keys"].shape[0]
        train = list(range(total - self.val_sequences))
        self.splits = {"train": AttentionWindows(self.data, train, self.window)}
        if self.val_sequences:
            val = list(range(total - self.val_sequences, total))
            self.splits["val"] = AttentionWindows(self.data, val, self.window)
