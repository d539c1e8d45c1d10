"""Callbacks: codebook health in the logs, reconstruction and usage PNGs, validation at the last step, the
exported model at the end of fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from tokenizers_q.checks import check_int
from tokenizers_q.files import atomic_write


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of this run: the logger's version folder, else the trainer's root."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def save_image_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    """Write images (B, C, H, W) in [0, 1] as one PNG grid."""
    from torchvision.utils import save_image

    return atomic_write(Path(path), lambda tmp: save_image(images.clamp(0, 1).float().cpu(), tmp, nrow=nrow, padding=1))


def plot_code_counts(counts: list[torch.Tensor], path: Path) -> Path:
    """Bar chart of code frequencies (most used first, log scale), one panel per codebook, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(counts), 1, figsize=(7, 1.8 * len(counts)), squeeze=False)
    for i, (ax, count) in enumerate(zip(axes[:, 0], counts)):
        used = int((count > 0).sum())
        ax.bar(range(count.numel()), count.cpu().sort(descending=True).values.numpy(), width=1.0)
        ax.set_yscale("log")
        ax.set_ylabel(f"codebook {i}")
        ax.set_title(f"{used}/{count.numel()} codes used ({100 * used / count.numel():.1f}%)", fontsize=9)
    axes[-1, 0].set_xlabel("codes, most used first")
    fig.tight_layout()
    try:
        return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    finally:
        plt.close(fig)


class CodebookHealth(L.Callback):
    """Log the quantizer's metrics (usage, perplexity, dead codes, per codebook) every N training steps.

    Args:
        every_n_steps: logging interval in training batches. Default: 50.
    """

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = check_int("every_n_steps", every_n_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = getattr(pl_module, "last_quantizer_metrics", {})
        if metrics and trainer.global_step % self.every_n_steps == 0:
            pl_module.log_dict({f"codebook/{k}": v.float() for k, v in metrics.items()})


class ReconstructionGrid(L.Callback):
    """After each validation, write ``reconstructions/step_XXXXXX.png`` and ``latest.png``.

    Rows alternate input images and their reconstructions (first validation batch).

    Args:
        num_images: images shown. Default: 16.
    """

    def __init__(self, num_images: int = 16):
        self.num_images = check_int("num_images", num_images)
        self._pair: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_path: Path | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and isinstance(outputs, dict) and "recon" in outputs:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            self._pair = (x[: self.num_images].cpu(), outputs["recon"][: self.num_images].cpu())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._pair is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        x, recon = self._pair
        per_row = min(8, x.shape[0])
        rows = [t for i in range(0, x.shape[0], per_row) for t in (x[i : i + per_row], recon[i : i + per_row])]
        grid = torch.cat(rows)
        folder = run_dir(trainer) / "reconstructions"
        save_image_grid(grid, folder / f"step_{trainer.global_step:06d}.png", nrow=per_row)
        self.last_path = save_image_grid(grid, folder / "latest.png", nrow=per_row)


class CodebookUsagePlot(L.Callback):
    """After each validation, plot how often each code was used: ``codebook_usage/latest.png``.

    One panel per codebook (at most ``max_panels``), codes sorted by frequency, on a log scale.
    """

    def __init__(self, max_panels: int = 8):
        self.max_panels = check_int("max_panels", max_panels)
        self._counts: list[torch.Tensor] | None = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._counts = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not isinstance(outputs, dict) or "codes" not in outputs:
            return
        codes = outputs["codes"].reshape(-1, outputs["codes"].shape[-1]).cpu()
        sizes = pl_module.quantizer.spec.codebook_sizes[: self.max_panels]
        if self._counts is None:
            self._counts = [torch.zeros(size) for size in sizes if size <= 2**16]
        for i, counts in enumerate(self._counts):
            counts += torch.bincount(codes[:, i], minlength=counts.numel()).float()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._counts or trainer.sanity_checking or not trainer.is_global_zero:
            return
        folder = run_dir(trainer) / "codebook_usage"
        for name in (f"step_{trainer.global_step:06d}.png", "latest.png"):
            plot_code_counts(self._counts, folder / name)


class SampleGrid(L.Callback):
    """After each validation, sample images from a transformer on tokens: ``samples/latest.png``.

    Decodes through the tokenizer named in the model's hyper-parameters (the one that
    made the training tokens); does nothing when there is none. With classes, each
    row is one class.

    Args:
        num_images: images sampled. Default: 40.
        seed: sampling seed, so grids of successive validations compare. Default: 0.
    """

    def __init__(self, num_images: int = 40, seed: int = 0):
        self.num_images, self.seed = check_int("num_images", num_images), seed
        self._tokenizer = None
        self.last_path: Path | None = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        path = getattr(pl_module.hparams, "tokenizer", None)
        if path is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if self._tokenizer is None:
            from tokenizers_q.trainers.artifacts import load_tokenizer

            self._tokenizer = load_tokenizer(path).to(pl_module.device)
        classes = pl_module.hparams.num_classes
        labels = torch.arange(self.num_images, device=pl_module.device) % classes if classes else None
        per_row = self.num_images // classes if classes else 8
        if labels is not None:
            labels = labels.view(per_row, classes).T.flatten() if self.num_images % classes == 0 else labels
        state = torch.get_rng_state()
        torch.manual_seed(self.seed)
        was_training = pl_module.training
        pl_module.eval()
        try:
            images = pl_module.sample_images(self._tokenizer, self.num_images, labels)
        finally:
            pl_module.train(was_training)
            torch.set_rng_state(state)  # sampling must not change the training run
        folder = run_dir(trainer) / "samples"
        save_image_grid(images, folder / f"step_{trainer.global_step:06d}.png", nrow=max(1, per_row))
        self.last_path = save_image_grid(images, folder / "latest.png", nrow=max(1, per_row))


class ValidateAtEnd(L.Callback):
    """Validate often enough in a ``max_steps`` run and after its last step, so every run writes its validation
    metrics (and the PNGs of the callbacks that draw on validation), whatever ``val_check_interval`` says: a
    400-step run with the configs' interval of 500 otherwise never validates.

    A step interval (``val_check_interval`` an int, ``check_val_every_n_epoch`` null) longer than
    ``max_steps / min_validations`` is shortened to it, so a short run still validates about
    ``min_validations`` times; a last step that is already a validation step validates once. To stop at the
    last step it sets ``Trainer.should_stop`` (Lightning validates when a run stops early), so this needs no
    private loop state.

    Args:
        min_validations: validations a run of ``max_steps`` steps gets at least (the last one at its end).
            Default: 4.
    """

    def __init__(self, min_validations: int = 4):
        self.min_validations = check_int("min_validations", min_validations)

    def setup(self, trainer, pl_module, stage: str) -> None:
        steps_mode = trainer.check_val_every_n_epoch is None and isinstance(trainer.val_check_interval, int)
        if stage == "fit" and trainer.max_steps > 0 and steps_mode:
            longest = max(1, trainer.max_steps // self.min_validations)
            trainer.val_check_interval = min(trainer.val_check_interval, longest)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


class ExportOnFitEnd(L.Callback):
    """At the end of ``fit``, write the trained module as an exported artifact (what ``tokq export`` writes):
    ``<run folder>/<filename>``, ready to share and to give to ``tokq encode/decode/sample``.

    Args:
        filename: the artifact's name inside the run folder. Default: ``"model.safetensors"``.
    """

    def __init__(self, filename: str = "model.safetensors"):
        if not filename.endswith(".safetensors") or Path(filename).name != filename:
            raise ValueError(f"filename must be a plain name ending in .safetensors, got {filename!r}")
        self.filename = filename

    def on_fit_end(self, trainer, pl_module) -> None:
        from tokenizers_q.trainers.artifacts import export_module

        if trainer.is_global_zero:
            export_module(pl_module, run_dir(trainer) / self.filename, trainer.datamodule)
