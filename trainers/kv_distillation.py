"""Lightning module training a KV tokenizer's codecs on a causal LM's next-token distribution (KL to fp)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_q.checks import check_int
from tokenizers_q.kv import apply_rotary
from tokenizers_q.kv.attention_inputs import attention_layers, model_head_dim
from tokenizers_q.trainers.kv_tokenizer import KVTokenizerModule
from tokenizers_q.trainers.module import Step, TrainingModule


@contextmanager
def coded_projections(
    model,
    key_codecs: Sequence[nn.Module],
    value_codecs: Sequence[nn.Module],
    sink_tokens: int = 0,
    rotary_tables: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Iterator[list[torch.Tensor]]:
    r"""Within the block, every attention layer of ``model`` reads its keys and values through the codecs (their
    ``quantized`` output, straight-through), as a cache of those codecs would hand them back, with gradients to
    the codecs; the first ``sink_tokens`` tokens stay exact. Yields the list the codecs' losses are appended to.

    Keys are coded before RoPE (what ``k_proj`` projects), or with ``rotary_tables`` (cos, sin of positions
    0..T-1) after it: rotated, coded and rotated back, so that the model's own RoPE gives the coded rotated key.

    Shapes:
        - rotary_tables: cos, sin (T, head_dim), T >= the sequences' length
    """
    layers = attention_layers(model)
    if not len(layers) == len(key_codecs) == len(value_codecs):
        raise ValueError(f"{len(layers)} attention layers but {len(key_codecs)} key / {len(value_codecs)} value codecs")
    head_dim, losses = model_head_dim(model), []

    def code(codec: nn.Module, keys: bool):
        def hook(module, args, output: torch.Tensor) -> torch.Tensor:
            batch, tokens, _ = output.shape
            heads = output.reshape(batch, tokens, -1, head_dim).transpose(1, 2)  # (B, H, T, D)
            exact, coded = heads[:, :, :sink_tokens], heads[:, :, sink_tokens:]
            if keys and rotary_tables is not None:
                cos, sin = (t[sink_tokens:tokens] for t in rotary_tables)
                coded = apply_rotary(coded, cos, sin)
            out = codec(coded)
            coded = out.quantized
            if keys and rotary_tables is not None:
                coded = apply_rotary(coded, cos, -sin)  # RoPE is a rotation: -sin undoes it
            losses.append(out.loss)
            return torch.cat([exact, coded], 2).transpose(1, 2).reshape(output.shape)

        return hook

    handles = []
    try:
        for layer, key_codec, value_codec in zip(layers, key_codecs, value_codecs):
            handles.append(layer.self_attn.k_proj.register_forward_hook(code(key_codec, True)))
            handles.append(layer.self_attn.v_proj.register_forward_hook(code(value_codec, False)))
        yield losses
    finally:
        for handle in handles:
            handle.remove()


class KVDistillationModule(TrainingModule):
    r"""Trains the codecs of a :class:`~tokenizers_q.trainers.KVTokenizerModule` so that a causal LM reading its
    keys and values through them predicts the next token as it does in full precision.

    The loss of a batch of token sequences is ``KL(p_fp || p_coded)`` of the next-token distributions, averaged
    over tokens, ``+ quantizer_weight *`` the codecs' own losses (averaged over codecs). ``p_fp`` comes from the
    model as it is, ``p_coded`` from the model with every layer's keys and values passed through the codecs
    (:func:`coded_projections`, the first ``sink_tokens`` exact, as ``tokenizer.layer_caches(sink_tokens=...)``
    stores them). The codecs' maps train through the straight-through gradient back through the model (whose
    parameters are frozen); their codebooks keep their own updates (EMA). Validation also logs the perplexity
    of both on the next tokens and how often their top choices agree.

    The model is not part of this module (nor of its checkpoints): it is moved to the module's device when
    fitting starts. The trained tokenizer is ``self.tokenizer`` (export it with
    :func:`~tokenizers_q.trainers.artifacts.export_module`; ``layer_caches`` makes its caches).

    Args:
        tokenizer: the codecs to train, of the model's layout (e.g. a calibrated
            :class:`~tokenizers_q.trainers.KVTokenizerModule`).
        model: a ``transformers`` causal LM with rotary attention (Llama, Mistral, Qwen, SmolLM, ...); its
            parameters are frozen.
        sink_tokens: first tokens of each sequence kept in full precision. Default: 1.
        quantizer_weight: weight of the codecs' losses. Default: 1.
        lr, weight_decay, warmup_steps, min_lr_ratio: AdamW with warm-up and cosine decay.
            Defaults: 1e-3, 0, 10, 0.1.

    Shapes:
        - batch: input_ids (B, T) int64 (:class:`~tokenizers_q.trainers.TokenSequenceDataModule`)
    """

    def __init__(
        self,
        tokenizer: KVTokenizerModule,
        model: nn.Module,
        sink_tokens: int = 1,
        quantizer_weight: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
    ):
        super().__init__()
        if not isinstance(tokenizer, KVTokenizerModule):
            raise TypeError(f"tokenizer must be a KVTokenizerModule, got {type(tokenizer).__name__}")
        layers, head_dim = len(attention_layers(model)), model_head_dim(model)
        if (tokenizer.hparams.num_layers, tokenizer.hparams.head_dim) != (layers, head_dim):
            raise ValueError(
                f"the tokenizer has {tokenizer.hparams.num_layers} layers of head_dim {tokenizer.hparams.head_dim}, "
                f"the model {layers} of head_dim {head_dim}"
            )
        check_int("sink_tokens", sink_tokens, 0)
        if quantizer_weight < 0:
            raise ValueError(f"quantizer_weight must be >= 0, got {quantizer_weight!r}")
        self.save_hyperparameters(ignore=["tokenizer", "model"])
        self.tokenizer = tokenizer
        self.models = (model.eval().requires_grad_(False),)  # a tuple: not a submodule, not in the state dict

    @property
    def model(self) -> nn.Module:
        return self.models[0]

    def on_fit_start(self) -> None:
        self.model.to(self.device)
        self.tokenizer.train()  # a calibrated tokenizer comes in eval mode, which Lightning keeps

    def losses(self, batch: dict[str, torch.Tensor], stage: str) -> Step:
        ids = batch["input_ids"]
        if ids.dim() != 2 or ids.shape[1] <= self.hparams.sink_tokens:
            raise ValueError(
                f"expected input_ids (B, T) with T > sink_tokens={self.hparams.sink_tokens}, got {tuple(ids.shape)}"
            )
        with torch.no_grad():
            reference = F.log_softmax(self.model(ids, use_cache=False).logits.float(), -1)
        rotary = None
        if not self.tokenizer.hparams.pre_rope:
            from tokenizers_q.kv.hf import hf_rotary  # transformers: the optional extra hf

            rotary = hf_rotary(self.model)(torch.arange(ids.shape[1], device=ids.device))
        tok = self.tokenizer
        with coded_projections(self.model, tok.key_codecs, tok.value_codecs, self.hparams.sink_tokens, rotary) as qs:
            coded = F.log_softmax(self.model(ids, use_cache=False).logits.float(), -1)
        kl = F.kl_div(coded.flatten(0, 1), reference.flatten(0, 1), log_target=True, reduction="batchmean")
        quantizer_loss = torch.stack([torch.as_tensor(q, device=kl.device) for q in qs]).mean()
        loss = kl + self.hparams.quantizer_weight * quantizer_loss
        logged = {"loss": loss, "kl": kl}
        if stage != "train":
            targets = ids[:, 1:].flatten()
            for name, log_probs in (("perplexity", coded), ("fp_perplexity", reference)):
                logged[name] = F.nll_loss(log_probs[:, :-1].flatten(0, 1), targets).exp()
            logged["top1_agreement"] = (coded.argmax(-1) == reference.argmax(-1)).float().mean()
        shown = ("loss", "kl", "perplexity") if stage == "val" else ("loss",)
        return Step(logged, batch_size=ids.shape[0], shown=shown)
