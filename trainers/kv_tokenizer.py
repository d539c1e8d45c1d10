"""Lightning module training KV-cache tokenizers on recorded attention activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_q.checks import check_int
from tokenizers_q.kv import (
    DenseAndSparseLayerCache,
    LayerCache,
    PreRoPELayerCache,
    QuantizerLayerCache,
    apply_rotary,
)
from tokenizers_q.kv.attention_inputs import check_attention_inputs
from tokenizers_q.kv.rope import Rotary
from tokenizers_q.models.kv_codec import KVCodec
from tokenizers_q.trainers.module import Step, TrainingModule


def relative_error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """``||got - want||^2 / ||want||^2`` over everything."""
    return (got - want).pow(2).sum() / want.pow(2).sum().clamp_min(1e-12)


def causal_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention with grouped key/value heads (each shared by H_q / H_kv query heads).

    Shapes:
        - queries: (B, H_q, T, D); keys, values: (B, H_kv, T, D); output: (B, H_q, T, D)
    """
    groups = queries.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(queries, keys, values, is_causal=True)


class KVTokenizerModule(TrainingModule):
    r"""One key codec and one value codec (:class:`~tokenizers_q.models.KVCodec`) per attention layer,
    trained to keep each layer's attention output, not only its keys and values.

    Per layer the loss is ``attention_weight * ||attn(q, K^, V^) - attn(q, K, V)||^2 / ||attn(q, K, V)||^2
    + reconstruction_weight * (relative error of K^ and of V^) + quantizer_weight * the codecs' losses``,
    averaged over layers, with causal attention inside each window of a
    :class:`~tokenizers_q.trainers.KVActivationDataModule`. With ``pre_rope`` keys are coded before the
    rotary embedding and rotated after decoding (as :class:`~tokenizers_q.kv.PreRoPELayerCache` stores them).

    Args:
        num_layers, head_dim: of the recorded model (``KVActivationDataModule.layout``).
        quantizer, quantizer_kwargs: the codecs' quantizer. Default: ``"rvq"`` with 16 levels of 256 codes.
        pre_rope: code keys before RoPE. Default: True.
        attention_weight, reconstruction_weight, quantizer_weight: loss weights. Defaults: 1, 0.1, 1.
        lr, weight_decay, warmup_steps, min_lr_ratio: AdamW with warm-up and cosine decay.
            Defaults: 1e-3, 0, 10, 0.1.

    Shapes:
        - batch: queries (B, L, H_q, W, D), keys and values (B, L, H_kv, W, D), cos and sin (B, W, D)
    """

    def __init__(
        self,
        num_layers: int,
        head_dim: int,
        quantizer: str = "rvq",
        quantizer_kwargs: dict | None = None,
        pre_rope: bool = True,
        attention_weight: float = 1.0,
        reconstruction_weight: float = 0.1,
        quantizer_weight: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
    ):
        super().__init__()
        check_int("num_layers", num_layers)
        check_int("head_dim", head_dim)
        for name, weight in (("attention_weight", attention_weight), ("reconstruction_weight", reconstruction_weight)):
            if weight < 0:
                raise ValueError(f"{name} must be >= 0, got {weight!r}")
        if attention_weight == reconstruction_weight == 0:
            raise ValueError("attention_weight and reconstruction_weight are both 0: nothing to train")
        self.save_hyperparameters()
        self.key_codecs = nn.ModuleList(KVCodec(head_dim, quantizer, quantizer_kwargs) for _ in range(num_layers))
        self.value_codecs = nn.ModuleList(KVCodec(head_dim, quantizer, quantizer_kwargs) for _ in range(num_layers))

    def bits_per_element(self) -> float:
        """Code bits per key or value element (shared codecs not counted)."""
        return self.key_codecs[0].spec.bits_per_token / self.hparams.head_dim

    @torch.no_grad()
    def calibrate(self, activations: dict, passes: int = 2) -> None:
        """Fit every codec to all recorded keys and values at once before training: its quantizer's k-means
        initialisation on the first pass, EMA updates on the ``passes - 1`` others.

        Shapes:
            - activations: from :func:`~tokenizers_q.kv.attention_inputs.collect_attention_inputs`
        """
        check_attention_inputs(activations)
        keys, values = activations["keys"], activations["values"]
        if keys.shape[1] != self.hparams.num_layers or keys.shape[-1] != self.hparams.head_dim:
            raise ValueError(
                f"this tokenizer has {self.hparams.num_layers} layers of head_dim {self.hparams.head_dim}, "
                f"got activations of {keys.shape[1]} layers of head_dim {keys.shape[-1]}"
            )
        self.train()
        for layer in range(self.hparams.num_layers):
            k = keys[:, layer].float()
            if not self.hparams.pre_rope:
                k = apply_rotary(k, activations["cos"], activations["sin"])
            for codec, x in ((self.key_codecs[layer], k), (self.value_codecs[layer], values[:, layer].float())):
                for _ in range(passes):
                    codec(x.reshape(-1, x.shape[-1]))

    def layer_caches(self, rotary: Rotary | None = None, sink_tokens: int = 0) -> list[LayerCache]:
        """Fresh caches storing each layer's keys and values as this tokenizer's codes, in layer order, with the
        first ``sink_tokens`` tokens in full precision; ``rotary`` (e.g. ``tokenizers_q.kv.hf.hf_rotary(model)``)
        is needed when keys are coded before RoPE."""
        if self.hparams.pre_rope and rotary is None:
            raise ValueError("this tokenizer codes keys before RoPE: pass the model's rotary tables (hf_rotary)")
        self.eval()
        caches = []
        for key_codec, value_codec in zip(self.key_codecs, self.value_codecs):
            cache = QuantizerLayerCache(key_codec, value_codec)
            if sink_tokens:
                cache = DenseAndSparseLayerCache(cache, sink_tokens=sink_tokens)
            caches.append(PreRoPELayerCache(cache, rotary) if self.hparams.pre_rope else cache)
        return caches

    def losses(self, batch: dict[str, torch.Tensor], stage: str) -> Step:
        hp = self.hparams
        queries, keys, values = batch["queries"], batch["keys"], batch["values"]
        if keys.shape[1] != hp.num_layers or keys.shape[-1] != hp.head_dim:
            raise ValueError(
                f"this tokenizer has {hp.num_layers} layers of head_dim {hp.head_dim}, "
                f"got a batch of {keys.shape[1]} layers of head_dim {keys.shape[-1]}"
            )
        cos, sin = batch["cos"][:, None], batch["sin"][:, None]  # (B, 1, W, D) broadcast over heads
        attention_errors, reconstruction_errors, quantizer_loss = [], [], 0.0
        for layer in range(hp.num_layers):
            q = apply_rotary(queries[:, layer], cos, sin)
            k = keys[:, layer] if hp.pre_rope else apply_rotary(keys[:, layer], cos, sin)
            v = values[:, layer]
            key_out, value_out = self.key_codecs[layer](k), self.value_codecs[layer](v)
            k_hat = apply_rotary(key_out.quantized, cos, sin) if hp.pre_rope else key_out.quantized
            rotated_k = apply_rotary(k, cos, sin) if hp.pre_rope else k
            reference = causal_attention(q, rotated_k, v)
            attention_errors.append(relative_error(causal_attention(q, k_hat, value_out.quantized), reference))
            reconstruction_errors.append(relative_error(key_out.quantized, k) + relative_error(value_out.quantized, v))
            quantizer_loss = quantizer_loss + key_out.loss + value_out.loss
        attention_error = torch.stack(attention_errors).mean()
        reconstruction_error = torch.stack(reconstruction_errors).mean() / 2
        loss = (
            hp.attention_weight * attention_error
            + hp.reconstruction_weight * reconstruction_error
            + hp.quantizer_weight * quantizer_loss / hp.num_layers
        )
        logged = {"loss": loss, "attention_error": attention_error, "kv_error": reconstruction_error}
        shown = ("loss", "attention_error") if stage == "val" else ("loss",)
        return Step(logged, batch_size=keys.shape[0], shown=shown)
