"""Architectures: image autoencoders, discriminators, token transformers, GNN encoders and graph transformers.

Installed as ``tokenizers_q.models``. The graph parts need torch_geometric (``pip install
"tokenizers_q[graph]"``) and are imported on first use.
"""

import importlib

from tokenizers_q.models.autoencoder import Decoder, Encoder, ResBlock
from tokenizers_q.models.discriminator import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from tokenizers_q.models.feature_classifier import FeatureClassifier
from tokenizers_q.models.kv_codec import KVCodec
from tokenizers_q.models.token_transformer import TokenTransformer, codes_to_digits, digits_to_codes

_LAZY = {
    "GNNEncoder": "graph_encoder",
    "DeepGraphInfomax": "graph_ssl",
    "LatentPrediction": "graph_ssl",
    "MaskedFeatureReconstruction": "graph_ssl",
    "GraphTransformer": "graph_transformer",
    "PerceptualLoss": "perceptual",
    "ppr_topk": "ppr",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Decoder",
    "Encoder",
    "DeepGraphInfomax",
    "FeatureClassifier",
    "GNNEncoder",
    "GraphTransformer",
    "KVCodec",
    "LatentPrediction",
    "MaskedFeatureReconstruction",
    "PatchDiscriminator",
    "PerceptualLoss",
    "ResBlock",
    "TokenTransformer",
    "adaptive_gan_weight",
    "codes_to_digits",
    "digits_to_codes",
    "hinge_d_loss",
    "hinge_g_loss",
    "ppr_topk",
]
