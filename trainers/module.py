"""The base of every training module: the step wrappers that log a dict of losses, one optimiser rule, the
warm-up cosine schedule, and the class tag that checkpoints carry.

A subclass implements :meth:`TrainingModule.losses` (what one batch of a stage costs, as a :class:`Step`);
``training_step``, ``validation_step`` and ``test_step`` call it through :meth:`TrainingModule._step`, which
logs every entry as ``{stage}/{name}`` and returns the loss (with the step's extra outputs, if any, for
callbacks). ``configure_optimizers`` builds AdamW over :func:`weight_decay_groups` (one rule for every module:
weight matrices decay; biases, normalisation and embedding parameters and every 1-D parameter do not) with the
schedule of :mod:`tokenizers_q.trainers.schedule`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, NamedTuple

import lightning as L
import torch
from torch import nn

from tokenizers_q.codebook import Codebook
from tokenizers_q.trainers.artifacts import MODULE_CLASS_KEY, class_path
from tokenizers_q.trainers.schedule import warmup_cosine_scheduler

#: modules whose parameters never decay: embedding tables (codebooks included) and normalisation layers
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Embedding,
    nn.EmbeddingBag,
    Codebook,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,  # batch and instance norms
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
#: words that mark a parameter (or the parameter list holding it) as an embedding: ``mask_embed``,
#: ``rank_embedding``, ``position``
EMBEDDING_WORDS = ("embed", "position")
#: AdamW's betas where a module has no ``betas`` hyper-parameter
DEFAULT_BETAS = (0.9, 0.999)


def decays(owner: nn.Module, name: str, parameter: nn.Parameter) -> bool:
    """Whether weight decay applies to ``parameter``, called ``name`` in its ``owner`` (for a parameter in an
    ``nn.ParameterList``, the list's own name): only to weight matrices, never to biases, normalisation or
    embedding parameters or any parameter of fewer than two dimensions."""
    if parameter.dim() < 2 or isinstance(owner, NO_DECAY_MODULES):
        return False
    return not any(word in name for word in EMBEDDING_WORDS)


def weight_decay_groups(module: nn.Module, weight_decay: float, exclude: Iterable[str] = ()) -> list[dict]:
    """AdamW parameter groups of ``module``'s trainable parameters under :func:`decays`: those that decay (with
    ``weight_decay``), then the others (with none); each parameter once, in module order; empty groups dropped.

    Args:
        exclude: names of submodules whose parameters are left out (e.g. ``["discriminator"]``).
    """
    exclude = tuple(exclude)
    groups: dict[bool, list[nn.Parameter]] = {True: [], False: []}
    seen: set[int] = set()
    for prefix, owner in module.named_modules():
        if any(prefix == e or prefix.startswith(f"{e}.") for e in exclude):
            continue
        list_name = prefix.rpartition(".")[2] if isinstance(owner, (nn.ParameterList, nn.ParameterDict)) else ""
        for name, parameter in owner.named_parameters(recurse=False):
            if id(parameter) in seen or not parameter.requires_grad:
                continue
            seen.add(id(parameter))
            groups[decays(owner, f"{list_name}.{name}" if list_name else name, parameter)].append(parameter)
    out = [{"params": groups[True], "weight_decay": weight_decay}, {"params": groups[False], "weight_decay": 0.0}]
    return [group for group in out if group["params"]]


class Step(NamedTuple):
    """What one batch of a stage gives :meth:`TrainingModule._step`.

    Fields:
        logged: scalars logged as ``{stage}/{name}``; ``"loss"`` is the one optimised.
        outputs: extra step outputs for callbacks (codes, reconstructions); returned with the loss as a dict.
        batch_size: for Lightning's averaging over an epoch; None: inferred from the batch.
        shown: names of ``logged`` shown on the progress bar.
    """

    logged: dict[str, torch.Tensor | float]
    outputs: dict[str, torch.Tensor] | None = None
    batch_size: int | None = None
    shown: tuple[str, ...] = ("loss",)


class TrainingModule(L.LightningModule):
    r"""Base of the library's LightningModules.

    Subclasses implement :meth:`losses` and save the hyper-parameters ``lr``, ``weight_decay``,
    ``warmup_steps``, ``min_lr_ratio`` (and optionally ``betas``), which :meth:`configure_optimizers` reads.

    Class attributes:
        fallback_total_steps: the schedule's length without a trainer (e.g. a module stepped by hand).
        renamed_arguments: earlier names of arguments; checkpoints and exports saved under them still load
            (:func:`tokenizers_q.files.current_arguments`, with a ``DeprecationWarning``).
        loss_only_arguments: parts that serve only the training loss and hold no state (e.g. a perceptual loss
            on a backbone file); a module loaded from a file for use is built without them, so it needs none
            of their files. Resuming a run (``tokq fit --ckpt_path``) builds them from the run's config.
    """

    fallback_total_steps: ClassVar[int] = 1000
    renamed_arguments: ClassVar[dict[str, str]] = {}
    loss_only_arguments: ClassVar[tuple[str, ...]] = ()

    def losses(self, batch, stage: str) -> Step:
        """The logged losses (``"loss"`` among them) of one batch of ``stage`` (train / val / test)."""
        raise NotImplementedError

    def _step(self, batch, stage: str):
        step = self.losses(batch, stage)
        for name, value in step.logged.items():
            value = value.detach() if isinstance(value, torch.Tensor) else value
            self.log(f"{stage}/{name}", value, prog_bar=name in step.shown, batch_size=step.batch_size)
        loss = step.logged["loss"]
        return loss if step.outputs is None else {"loss": loss, **step.outputs}

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._step(batch, "test")

    # -- optimisation -------------------------------------------------------------------------
    def make_optimizer(self, module: nn.Module | None = None, weight_decay: float | None = None, exclude=()):
        """AdamW over :func:`weight_decay_groups` of ``module`` (default: this module), at the ``lr``, ``betas``
        and ``weight_decay`` hyper-parameters unless given."""
        hp = self.hparams
        weight_decay = hp.weight_decay if weight_decay is None else weight_decay
        groups = weight_decay_groups(self if module is None else module, weight_decay, exclude)
        return torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.get("betas", DEFAULT_BETAS)))

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """The warm-up cosine schedule of ``optimizer``, per step."""
        return warmup_cosine_scheduler(optimizer, self, fallback_total=self.fallback_total_steps)

    def configure_optimizers(self):
        optimizer = self.make_optimizer()
        return [optimizer], [{"scheduler": self.make_scheduler(optimizer), "interval": "step"}]

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Name this module's class in the checkpoint (the loaders rebuild modules made in Python too), and drop
        hyper-parameters that are module objects: they are in the state dict already, and pickling them would
        make the checkpoint unloadable with ``torch.load(weights_only=True)``."""
        checkpoint[MODULE_CLASS_KEY] = class_path(type(self))
        hparams = checkpoint.get("hyper_parameters", {})
        checkpoint["hyper_parameters"] = {k: v for k, v in hparams.items() if not isinstance(v, nn.Module)}
