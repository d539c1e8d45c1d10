"""Architectures: image autoencoders, discriminators, token transformers (installed as ``tokenizers_q.models``)."""

from tokenizers_q.models.autoencoder import Decoder, Encoder, ResBlock
from tokenizers_q.models.discriminator import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from tokenizers_q.models.feature_classifier import FeatureClassifier
from tokenizers_q.models.token_transformer import TokenTransformer, codes_to_digits, digits_to_codes

__all__ = [
    "Decoder",
    "Encoder",
    "FeatureClassifier",
    "PatchDiscriminator",
    "ResBlock",
    "TokenTransformer",
    "adaptive_gan_weight",
    "codes_to_digits",
    "digits_to_codes",
    "hinge_d_loss",
    "hinge_g_loss",
]
