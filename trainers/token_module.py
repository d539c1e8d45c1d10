"""What the transformers on tokens share: the model built from the token layout, optimisation, sampling to images."""

from __future__ import annotations

import math

import torch
from torch import nn

from tokenizers_q.models.token_transformer import TokenTransformer
from tokenizers_q.packing import TokenSpec
from tokenizers_q.trainers.artifacts import load_tokenizer
from tokenizers_q.trainers.module import TrainingModule
from tokenizers_q.trainers.token_data import token_file_layout

BITS_PER_NAT = 1.0 / math.log(2.0)


class TokenModule(TrainingModule):
    r"""Base of :class:`MaskedTokenModule` and :class:`AutoregressiveTokenModule`.

    The transformer's heads come from the tokens' layout (TokenSpec, grid, and the
    tokenizer checkpoint named in the token file), stored in the hyper-parameters so
    that checkpoints rebuild the model. It is read from ``spec`` and ``grid`` when
    given, else from ``token_file``, else, when training, from the data module
    (:class:`~tokenizers_q.trainers.TokenDataModule`) in ``configure_model``.

    Args:
        token_file: a token file to read the layout from.
        spec: TokenSpec as a dict (``TokenSpec.to_dict()``), instead of ``token_file``.
        grid: token grid per example, e.g. ``[8, 8]``, instead of ``token_file``.
        tokenizer: the tokenizer (export or checkpoint) that made the tokens (for sampling images
            and codebook initialisation); default: the one named in the token file.
        tokenizer_fingerprint: that tokenizer's fingerprint, checked when sampling; default: the token file's.
        num_classes: classes for conditioning (0: unconditional). Default: 0.
        dim, depth, num_heads, mlp_ratio, dropout, factorised, positions: see
            :class:`~tokenizers_q.models.TokenTransformer` (checkpoints saved with ``heads`` still load).
        init_from_codebook: start the token embeddings from the tokenizer's code vectors. Default: False.
        lr: peak AdamW learning rate. Default: 1e-3.
        betas: AdamW betas. Default: (0.9, 0.95).
        weight_decay: on weight matrices only (see :class:`~tokenizers_q.trainers.module.TrainingModule`).
            Default: 0.05.
        warmup_steps: linear warm-up. Default: 200.
        min_lr_ratio: cosine decay floor. Default: 0.1.
    """

    fallback_total_steps = 10_000
    renamed_arguments = {"heads": "num_heads"}

    def __init__(
        self,
        token_file: str | None = None,
        spec: dict | None = None,
        grid: list[int] | None = None,
        tokenizer: str | None = None,
        tokenizer_fingerprint: str | None = None,
        num_classes: int = 0,
        dim: int = 256,
        depth: int = 6,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        factorised: bool = False,
        positions: str = "grid",
        init_from_codebook: bool = False,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.05,
        warmup_steps: int = 200,
        min_lr_ratio: float = 0.1,
    ):
        super().__init__()
        if (spec is None or grid is None) and token_file is not None:
            file_spec, file_grid, file_tokenizer, file_fingerprint = token_file_layout(token_file)
            spec, grid, tokenizer = spec or file_spec, grid or file_grid, tokenizer or file_tokenizer
            tokenizer_fingerprint = tokenizer_fingerprint or file_fingerprint
        self.save_hyperparameters()
        self.transformer: TokenTransformer | None = None
        if spec is not None and grid is not None:
            self._build(spec, grid, tokenizer)

    def _build(self, spec, grid, tokenizer: str | None) -> None:
        hp = self.hparams
        if isinstance(spec, TokenSpec):
            spec = spec.to_dict()
        self.hparams.update(spec=dict(spec), grid=list(grid), tokenizer=tokenizer)
        self.transformer = TokenTransformer(
            spec,
            grid,
            hp.dim,
            hp.depth,
            hp.num_heads,
            hp.mlp_ratio,
            hp.dropout,
            hp.factorised,
            hp.positions,
            hp.num_classes,
        )

    def configure_model(self) -> None:
        if self.transformer is not None:
            return
        data = self.trainer.datamodule if self._trainer is not None else None
        if data is None or getattr(data, "spec", None) is None:
            raise ValueError(
                "the token layout is unknown: give spec and grid, or token_file, or train with a TokenDataModule"
            )
        self._build(data.spec, data.grid, self.hparams.tokenizer or data.metadata.get("checkpoint"))
        self.hparams.tokenizer_fingerprint = self.hparams.tokenizer_fingerprint or data.fingerprint

    @property
    def seq_len(self) -> int:
        return self.transformer.seq_len

    def _labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """Class labels for the prefix: -1 (no label) and everything when unconditional map to "no class"."""
        if labels is None or self.hparams.num_classes == 0:
            return None
        return torch.where(labels < 0, torch.full_like(labels, self.hparams.num_classes), labels)

    def _batch(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        codes, labels = batch if isinstance(batch, (list, tuple)) else (batch, None)
        if codes.dim() != 3 or codes.shape[1] != self.seq_len:
            raise ValueError(f"expected codes (B, {self.seq_len}, num_codebooks), got {tuple(codes.shape)}")
        return codes, self._labels(labels)

    def on_fit_start(self) -> None:
        if self.hparams.init_from_codebook and self.trainer.ckpt_path is None:
            if self.hparams.tokenizer is None:
                raise ValueError("init_from_codebook needs the tokenizer checkpoint (tokenizer=...)")
            vectors = load_tokenizer(self.hparams.tokenizer).quantizer.code_vectors()
            self.transformer.init_embeddings_from([v.to(self.device) for v in vectors])

    # -- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample_images(self, tokenizer: nn.Module, num: int, labels: torch.Tensor | None = None, **kwargs):
        """Sample token grids (the subclass's ``generate``) and decode them to images with ``tokenizer``."""
        if tokenizer.quantizer.spec != self.transformer.spec:
            raise ValueError(
                f"the tokenizer makes {tokenizer.quantizer.spec} tokens, this model was trained on "
                f"{self.transformer.spec}: sample with the tokenizer that made the training tokens"
            )
        codes = self.generate(num, labels, **kwargs)
        return tokenizer.decode(codes)

    def _grid(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.view(codes.shape[0], *self.transformer.grid, codes.shape[-1])
