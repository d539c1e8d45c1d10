"""Token files as training data for transformers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from tokenizers_q.packing import TokenFile, load_tokens
from tokenizers_q.trainers.data import SplitDataModule


class TokenDataset(Dataset):
    """Examples of a token file: codes (L, num_codebooks) in raster order, and a label (-1 if none)."""

    def __init__(self, tokens: TokenFile):
        codes = tokens.codes
        if codes.dim() < 3:
            raise ValueError(f"expected codes (N, *grid, num_codebooks), got {tuple(codes.shape)}")
        self.grid = tuple(codes.shape[1:-1])
        self.codes = codes.flatten(1, -2)
        labels = tokens.extras.get("labels")
        self.labels = torch.full((len(codes),), -1, dtype=torch.long) if labels is None else labels.long()
        if self.labels.shape != (len(codes),):
            raise ValueError(f"labels of shape {tuple(self.labels.shape)} do not match {len(codes)} examples")

    def __len__(self) -> int:
        return self.codes.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes[i], self.labels[i]


class TokenDataModule(SplitDataModule):
    r"""Train / val / test tokens from files written by ``tokq encode``.

    Args:
        train_tokens: token file of the training split.
        val_tokens: token file for validation; default: ``val_fraction`` of the training file.
        test_tokens: token file for testing (optional).
        val_fraction: share of the training file held out when ``val_tokens`` is not given. Default: 0.05.
        batch_size: Default: 64.
        num_workers: Default: 0.
        seed: seed of the split and of the training order. Default: 0.

    All files must hold the same :class:`TokenSpec` and grid.
    """

    item_name = "tokens"

    def __init__(
        self,
        train_tokens: str,
        val_tokens: str | None = None,
        test_tokens: str | None = None,
        val_fraction: float = 0.05,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.paths = {"train": train_tokens, "val": val_tokens, "test": test_tokens}
        self.val_fraction, self.batch_size, self.num_workers, self.seed = val_fraction, batch_size, num_workers, seed
        self.splits: dict[str, Dataset] = {}
        self.spec, self.grid, self.metadata, self.fingerprint = None, None, {}, None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        files = {k: load_tokens(p) for k, p in self.paths.items() if p is not None}
        train = files["train"]
        for split, f in files.items():
            if f.fingerprint != train.fingerprint:
                raise ValueError(
                    f"{self.paths[split]} was encoded by another tokenizer (fingerprint {f.fingerprint}) than the "
                    f"training file {self.paths['train']} ({train.fingerprint})"
                )
            if f.spec != train.spec or f.codes.shape[1:] != train.codes.shape[1:]:
                raise ValueError(
                    f"{self.paths[split]} holds {f.spec} tokens of shape {tuple(f.codes.shape[1:])}, but the training "
                    f"file {self.paths['train']} holds {train.spec} of shape {tuple(train.codes.shape[1:])}"
                )
        data = {k: TokenDataset(f) for k, f in files.items()}
        if "val" not in data:
            full = data["train"]
            n_val = max(1, int(len(full) * self.val_fraction)) if self.val_fraction > 0 else 0
            order = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed)).tolist()
            data["train"], data["val"] = Subset(full, order[n_val:]), Subset(full, order[:n_val])
        self.splits = data
        self.spec, self.grid, self.metadata = train.spec, tuple(train.codes.shape[1:-1]), train.metadata
        self.fingerprint = train.fingerprint


def token_file_layout(path: str | Path) -> tuple[dict, list[int], str | None, str | None]:
    """(TokenSpec dict, grid, path of the tokenizer that made them, its fingerprint) of a token file."""
    tokens = load_tokens(path)
    grid = list(tokens.codes.shape[1:-1])
    return tokens.spec.to_dict(), grid, tokens.metadata.get("checkpoint"), tokens.fingerprint
