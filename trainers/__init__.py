"""Lightning modules, data modules, callbacks and the ``tokq`` CLI (installed as ``tokenizers_q.trainers``)."""

from tokenizers_q.trainers.autoencoder import AutoencoderModule
from tokenizers_q.trainers.callbacks import CodebookHealth, CodebookUsagePlot, ReconstructionGrid
from tokenizers_q.trainers.data import EpochSeededSampler, ImageDataModule, ResumableLoader

__all__ = [
    "AutoencoderModule",
    "CodebookHealth",
    "CodebookUsagePlot",
    "EpochSeededSampler",
    "ImageDataModule",
    "ReconstructionGrid",
    "ResumableLoader",
]
