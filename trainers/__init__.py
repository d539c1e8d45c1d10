"""Lightning modules, data modules, callbacks and the ``tokq`` CLI (installed as ``tokenizers_q.trainers``).

Every training module subclasses :class:`~tokenizers_q.trainers.module.TrainingModule`; every trained module
is read back by :func:`~tokenizers_q.trainers.artifacts.load_module` (``load_tokenizer`` and its siblings name
the kind expected). Nothing here needs ``transformers``; the graph parts need ``torch_geometric`` (the extra
``graph``), imported on first use and listed in ``__all__`` only where it is installed.
"""

import importlib
import importlib.util

from tokenizers_q.kv.attention_inputs import collect_attention_inputs
from tokenizers_q.trainers.artifacts import (
    load_graph_tokenizer,
    load_kv_tokenizer,
    load_module,
    load_token_model,
    load_tokenizer,
)
from tokenizers_q.trainers.autoencoder import AutoencoderModule
from tokenizers_q.trainers.autoregressive import AutoregressiveTokenModule
from tokenizers_q.trainers.callbacks import (
    CodebookHealth,
    CodebookUsagePlot,
    ExportOnFitEnd,
    ReconstructionGrid,
    SampleGrid,
    ValidateAtEnd,
)
from tokenizers_q.trainers.data import EpochSeededSampler, ImageDataModule, ResumableLoader
from tokenizers_q.trainers.kv_data import KVActivationDataModule, TokenSequenceDataModule
from tokenizers_q.trainers.kv_distillation import KVDistillationModule
from tokenizers_q.trainers.kv_tokenizer import KVTokenizerModule
from tokenizers_q.trainers.maskgit import MaskedTokenModule
from tokenizers_q.trainers.module import TrainingModule
from tokenizers_q.trainers.token_data import TokenDataModule

_LAZY = {  # graph parts: torch_geometric is an optional extra, imported on first use
    "GraphDataModule": "graph_data",
    "ba_house": "graph_data",
    "contextual_sbm": "graph_data",
    "GraphTokenizerModule": "graph_tokenizer",
    "GraphTransformerModule": "graph_transformer",
    "NodeTokenDataModule": "node_tokens",
    "write_node_tokens": "node_tokens",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AutoencoderModule",
    "AutoregressiveTokenModule",
    "CodebookHealth",
    "CodebookUsagePlot",
    "EpochSeededSampler",
    "ExportOnFitEnd",
    "ValidateAtEnd",
    "ImageDataModule",
    "KVActivationDataModule",
    "KVDistillationModule",
    "KVTokenizerModule",
    "MaskedTokenModule",
    "ReconstructionGrid",
    "ResumableLoader",
    "SampleGrid",
    "TokenDataModule",
    "TokenSequenceDataModule",
    "TrainingModule",
    "collect_attention_inputs",
    "load_graph_tokenizer",
    "load_kv_tokenizer",
    "load_module",
    "load_token_model",
    "load_tokenizer",
]
if importlib.util.find_spec("torch_geometric") is not None:  # `import *` works without the graph extra
    __all__ += sorted(_LAZY)
