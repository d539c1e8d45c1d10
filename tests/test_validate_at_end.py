"""Every run validates at its last step: ValidateAtEnd with a real Trainer, and in every shipped config."""

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from tokenizers_q.trainers import ValidateAtEnd

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer, self.validated_at = torch.nn.Linear(2, 1), []

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.validated_at.append(self.global_step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def validation_steps(tmp_path, callbacks, max_steps, samples=64, **intervals) -> list[int]:
    """Fit the recorder with a real Trainer (batches of 4); the global steps at which it validated."""
    loader = DataLoader(TensorDataset(torch.randn(samples, 2)), batch_size=4)
    module = Recorder()
    trainer = L.Trainer(
        max_steps=max_steps,
        **intervals,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader, loader)
    assert trainer.global_step == max_steps
    return module.validated_at


@pytest.mark.parametrize(
    ("callbacks", "max_steps", "interval", "expected"),
    [
        ([], 10, 50, []),  # without it a run shorter than its interval never validates
        ([ValidateAtEnd(min_validations=1)], 10, 50, [10]),
        ([ValidateAtEnd(min_validations=1)], 12, 4, [4, 8, 12]),  # a last step on the interval validates once
        ([ValidateAtEnd(min_validations=1)], 30, 8, [8, 16, 24, 30]),
        ([ValidateAtEnd()], 10, 50, [2, 4, 6, 8, 10]),  # the interval shrinks to max_steps // 4
        ([ValidateAtEnd()], 30, 8, [7, 14, 21, 28, 30]),
        ([ValidateAtEnd()], 40, 5, [5, 10, 15, 20, 25, 30, 35, 40]),  # already short enough: kept
        ([ValidateAtEnd(min_validations=3)], 2, 50, [1, 2]),  # never below one step
    ],
)
def test_a_run_validates_at_its_last_step(callbacks, max_steps, interval, expected, tmp_path):
    steps = validation_steps(tmp_path, callbacks, max_steps, val_check_interval=interval, check_val_every_n_epoch=None)
    assert steps == expected


def test_an_interval_given_in_epochs_is_left_alone(tmp_path):
    steps = validation_steps(tmp_path, [ValidateAtEnd()], 8, samples=16, check_val_every_n_epoch=1)  # 4 steps an epoch
    assert steps == [4, 8]


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (0, ValueError, "min_validations must be a positive int, got 0"),
        (-1, ValueError, "min_validations must be a positive int, got -1"),
        (2.5, TypeError, r"min_validations must be an int, got 2.5 \(float\)"),
        (True, TypeError, r"min_validations must be an int, got True \(bool\)"),
    ],
)
def test_min_validations_is_checked(bad, error, message):
    with pytest.raises(error, match=message):
        ValidateAtEnd(min_validations=bad)


def test_every_shipped_config_with_a_validation_interval_validates_at_the_end():
    configs = [p for p in sorted(CONFIGS.glob("*/*.yaml")) if "val_check_interval" in p.read_text()]
    assert len(configs) >= 8
    for path in configs:
        callbacks = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
        assert any(c["class_path"] == "tokenizers_q.trainers.ValidateAtEnd" for c in callbacks), path.name
