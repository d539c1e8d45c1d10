"""Lightning modules, data modules, callbacks and the ``tokq`` CLI (installed as ``tokenizers_q.trainers``)."""

from tokenizers_q.trainers.autoencoder import AutoencoderModule, load_tokenizer
from tokenizers_q.trainers.autoregressive import AutoregressiveTokenModule
from tokenizers_q.trainers.callbacks import CodebookHealth, CodebookUsagePlot, ReconstructionGrid, SampleGrid
from tokenizers_q.trainers.data import EpochSeededSampler, ImageDataModule, ResumableLoader
from tokenizers_q.trainers.maskgit import MaskedTokenModule
from tokenizers_q.trainers.token_data import TokenDataModule

__all__ = [
    "AutoencoderModule",
    "AutoregressiveTokenModule",
    "CodebookHealth",
    "CodebookUsagePlot",
    "EpochSeededSampler",
    "ImageDataModule",
    "MaskedTokenModule",
    "ReconstructionGrid",
    "ResumableLoader",
    "SampleGrid",
    "TokenDataModule",
    "load_tokenizer",
]
