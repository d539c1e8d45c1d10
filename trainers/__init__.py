"""Lightning modules, data modules, callbacks and the ``tokq`` CLI (installed as ``tokenizers_q.trainers``)."""

import importlib

from tokenizers_q.trainers.autoencoder import AutoencoderModule, load_tokenizer
from tokenizers_q.trainers.autoregressive import AutoregressiveTokenModule
from tokenizers_q.trainers.callbacks import (
    CodebookHealth,
    CodebookUsagePlot,
    ExportOnFitEnd,
    ReconstructionGrid,
    SampleGrid,
)
from tokenizers_q.trainers.data import EpochSeededSampler, ImageDataModule, ResumableLoader
from tokenizers_q.trainers.maskgit import MaskedTokenModule
from tokenizers_q.trainers.token_data import TokenDataModule

_LAZY = {  # graph parts: torch_geometric is an optional extra, imported on first use
    "GraphDataModule": "graph_data",
    "ba_house": "graph_data",
    "contextual_sbm": "graph_data",
    "GraphTokenizerModule": "graph_tokenizer",
    "load_graph_tokenizer": "graph_tokenizer",
    "GraphTransformerModule": "graph_transformer",
    "NodeTokenDataModule": "node_tokens",
    "write_node_tokens": "node_tokens",
    # KV parts: transformers is an optional extra
    "KVActivationDataModule": "kv_data",
    "collect_attention_inputs": "kv_data",
    "KVTokenizerModule": "kv_tokenizer",
    "load_kv_tokenizer": "kv_tokenizer",
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
    "GraphDataModule",
    "GraphTokenizerModule",
    "GraphTransformerModule",
    "ImageDataModule",
    "KVActivationDataModule",
    "KVTokenizerModule",
    "MaskedTokenModule",
    "NodeTokenDataModule",
    "ReconstructionGrid",
    "ResumableLoader",
    "SampleGrid",
    "TokenDataModule",
    "ba_house",
    "collect_attention_inputs",
    "contextual_sbm",
    "load_graph_tokenizer",
    "load_kv_tokenizer",
    "load_tokenizer",
    "write_node_tokens",
]
