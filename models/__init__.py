"""Architectures: image autoencoders and discriminators (installed as ``tokenizers_q.models``)."""

from tokenizers_q.models.autoencoder import Decoder, Encoder, ResBlock
from tokenizers_q.models.discriminator import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss

__all__ = [
    "Decoder",
    "Encoder",
    "PatchDiscriminator",
    "ResBlock",
    "adaptive_gan_weight",
    "hinge_d_loss",
    "hinge_g_loss",
]
