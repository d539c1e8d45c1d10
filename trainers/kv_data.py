"""Data for training KV tokenizers: attention activations of a causal LM, or the token sequences it reads.

:func:`~tokenizers_q.kv.attention_inputs.collect_attention_inputs` (in the core, without Lightning) records
what each attention layer of a ``transformers`` decoder projects; :class:`KVActivationDataModule` serves
windows of it (for the attention-output loss). :class:`TokenSequenceDataModule` serves token sequences (for
the next-token loss, which runs the model itself).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from tokenizers_q.checks import check_int
from tokenizers_q.kv.attention_inputs import ACTIVATIONS, check_attention_inputs, read_attention_inputs
from tokenizers_q.trainers.data import SplitDataModule


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
        source: a dict from :func:`~tokenizers_q.kv.attention_inputs.collect_attention_inputs` or the
            path it was saved to.
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
            source = read_attention_inputs(source)
        else:
            check_attention_inputs(source)
        num_sequences, tokens = source["keys"].shape[0], source["keys"].shape[3]
        check_int("window", window, 1, tokens)
        check_int("val_sequences", val_sequences, 0, num_sequences - 1)
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


class TokenSequences(Dataset):
    """Token sequences of one length, one per item: ``{"input_ids": (T,) int64}``."""

    def __init__(self, sequences: torch.Tensor):
        self.sequences = sequences

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.sequences[index]}


class TokenSequenceDataModule(SplitDataModule):
    r"""Token sequences of a causal LM's vocabulary (e.g. for :class:`~tokenizers_q.trainers.KVDistillationModule`);
    the last ``val_sequences`` validate.

    Args:
        sequences: a tensor (N, T) of token ids, or a list of N tensors (T,) of one length.
        val_sequences: sequences held out for validation. Default: 1.
        batch_size, num_workers, seed: loading. Defaults: 1, 0, 0.

    Shapes:
        - batch: input_ids (B, T) int64
    """

    item_name = "sequences"

    def __init__(
        self,
        sequences: torch.Tensor | list[torch.Tensor],
        val_sequences: int = 1,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if isinstance(sequences, (list, tuple)):
            if not sequences or any(
                not isinstance(s, torch.Tensor) or s.shape != sequences[0].shape for s in sequences
            ):
                raise ValueError("sequences must be a non-empty list of token tensors (T,) of one length")
            sequences = torch.stack(list(sequences))
        if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.is_floating_point():
            got = tuple(sequences.shape) if isinstance(sequences, torch.Tensor) else type(sequences).__name__
            raise ValueError(f"sequences must be integer token ids (N, T), got {got}")
        check_int("val_sequences", val_sequences, 0, sequences.shape[0] - 1)
        self.sequences, self.val_sequences = sequences.long(), val_sequences
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.splits = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train = len(self.sequences) - self.val_sequences
        self.splits = {"train": TokenSequences(self.sequences[:train])}
        if self.val_sequences:
            self.splits["val"] = TokenSequences(self.sequences[train:])
