"""The learning-rate schedule of every training module: linear warm-up, then cosine decay."""

from __future__ import annotations

import math

import lightning as L
import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, module: L.LightningModule, fallback_total: int = 10_000
) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`warmup_cosine` per step over the trainer's estimated steps (``fallback_total`` without a trainer),
    from the module's ``warmup_steps`` and ``min_lr_ratio`` hyper-parameters."""
    hp = module.hparams
    total = max(1, int(module.trainer.estimated_stepping_batches)) if module._trainer is not None else fallback_total
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio)
    )
