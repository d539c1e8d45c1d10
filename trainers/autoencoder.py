"""Lightning module training an image tokenizer: encoder -> quantizer -> decoder."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from tokenizers_q.checks import check_choice
from tokenizers_q.metrics import code_counts, usage_metrics
from tokenizers_q.models.discriminator import adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from tokenizers_q.quantizers import Quantizer, QuantizerOutput
from tokenizers_q.trainers.module import Step, TrainingModule

RECON_LOSSES = ("l1", "l2")
#: the discriminator's AdamW weight decay (AdamW's default, which it always had)
DISCRIMINATOR_WEIGHT_DECAY = 0.01


class AutoencoderModule(TrainingModule):
    r"""A discrete image autoencoder with injected parts.

    Images enter and leave in [0, 1]; the encoder sees them in [-1, 1].

    Args:
        encoder: image -> (B, latent_dim, h, w) map (e.g. :class:`~tokenizers_q.models.Encoder`).
        decoder: quantized map -> image.
        quantizer: any library quantizer with ``dim == latent_dim`` (channel-first or not).
        lr: peak learning rate of AdamW. Default: 2e-3.
        betas: AdamW betas. Default: (0.9, 0.99).
        weight_decay: AdamW weight decay of weight matrices (see :class:`~tokenizers_q.trainers.module.TrainingModule`).
            Default: 0.
        warmup_steps: linear warm-up steps. Default: 100.
        min_lr_ratio: the cosine schedule decays to ``lr * min_lr_ratio`` at the last step. Default: 0.05.
        recon_loss: ``"l1"`` or ``"l2"``. Default: ``"l1"``.
        quantizer_weight: weight of the quantizer's own loss. Default: 1.
        grad_clip: gradient-norm clip (0: off). Default: 1.
        discriminator: optional PatchGAN; adds hinge GAN losses with VQGAN's adaptive weight.
        disc_start_step: batches before the GAN losses switch on. Default: 2000.
        disc_weight: scale of the adaptive GAN weight. Default: 0.5.
        disc_warmup_steps: after ``disc_start_step`` the generator's GAN weight ramps linearly from 0 to
            ``disc_weight`` over this many batches (0: at once). Default: 0.
        perceptual: optional perceptual distance (e.g. :class:`~tokenizers_q.models.PerceptualLoss`) added to the
            reconstruction loss. Default: None.
        perceptual_weight: its weight. Default: 1.
        ema_decay: keep an exponential moving average of the encoder and decoder weights (0: off); validation,
            test, ``encode`` and ``decode`` then run on the averaged weights, training on the live ones. The
            quantizer is shared (its EMA codebook is an average already). Default: 0.
        entropy_annealing_steps: the entropy terms of BSQ/LFQ quantizers (inside RVQ/PQ too) start at
            ``entropy_annealing_factor`` times their ``entropy_loss_weight`` and decay linearly to it over this
            many batches, as Open-MAGVIT2/MaskBit do (0: constant). Default: 0.
        entropy_annealing_factor: that starting multiple. Default: 1.

    Shapes:
        - input: (B, C, H, W) in [0, 1]
        - output: reconstruction (B, C, H, W) and the :class:`QuantizerOutput`
    """

    fallback_total_steps = 10_000
    loss_only_arguments = ("perceptual",)

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        quantizer: Quantizer,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.05,
        recon_loss: str = "l1",
        quantizer_weight: float = 1.0,
        grad_clip: float = 1.0,
        discriminator: nn.Module | None = None,
        disc_start_step: int = 2000,
        disc_weight: float = 0.5,
        disc_warmup_steps: int = 0,
        perceptual: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        ema_decay: float = 0.0,
        entropy_annealing_steps: int = 0,
        entropy_annealing_factor: float = 1.0,
    ):
        super().__init__()
        check_choice("recon_loss", recon_loss, RECON_LOSSES)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if entropy_annealing_factor < 1.0:
            raise ValueError(f"entropy_annealing_factor must be >= 1, got {entropy_annealing_factor}")
        for name, value in (
            ("disc_warmup_steps", disc_warmup_steps),
            ("entropy_annealing_steps", entropy_annealing_steps),
        ):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(quantizer, Quantizer):
            raise TypeError(f"quantizer must be a tokenizers_q Quantizer, got {type(quantizer).__name__}")
        for part, module in (("encoder", encoder), ("decoder", decoder)):
            latent_dim = getattr(module, "latent_dim", quantizer.dim)
            if latent_dim != quantizer.dim:
                raise ValueError(f"{part} latent_dim {latent_dim} must equal the quantizer's dim {quantizer.dim}")
        self.save_hyperparameters()
        self.automatic_optimization = False  # the optional GAN alternates two optimizers
        self.encoder, self.decoder, self.quantizer, self.discriminator = encoder, decoder, quantizer, discriminator
        self.perceptual = perceptual
        self.ema = None
        if ema_decay > 0:
            self.ema = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "decoder": copy.deepcopy(decoder)})
            self.ema.requires_grad_(False)
        #: each BSQ/LFQ entropy weight the annealing scales, with its base value
        self.entropy_weights = {
            name: module.entropy_loss_weight
            for name, module in quantizer.named_modules()
            if isinstance(getattr(module, "entropy_loss_weight", None), (int, float))
        }
        self.last_quantizer_metrics: dict[str, torch.Tensor] = {}

    # -- the tokenizer ---------------------------------------------------------------
    def _coder(self) -> tuple[nn.Module, nn.Module]:
        """The encoder and decoder in use: the averaged ones outside training when ``ema_decay`` > 0."""
        if self.ema is not None and not self.training:
            return self.ema["encoder"], self.ema["decoder"]
        return self.encoder, self.decoder

    def _quantize(self, z: torch.Tensor) -> QuantizerOutput:
        if self.quantizer.channel_first:
            return self.quantizer(z)
        out = self.quantizer(z.movedim(1, -1))
        return out._replace(quantized=out.quantized.movedim(-1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        in_channels = getattr(self.encoder, "in_channels", x.shape[1])
        if x.dim() != 4 or x.shape[1] != in_channels:
            raise ValueError(f"expected images (B, {in_channels}, H, W), got {tuple(x.shape)}")
        encoder, decoder = self._coder()
        out = self._quantize(encoder(x * 2.0 - 1.0))
        return decoder(out.quantized) * 0.5 + 0.5, out

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> codes (B, h, w, num_codebooks)."""
        z = self._coder()[0](x * 2.0 - 1.0)
        return self.quantizer.encode(z if self.quantizer.channel_first else z.movedim(1, -1))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w, num_codebooks) -> images (B, C, H, W), clamped to [0, 1]."""
        q = self.quantizer.decode(codes)
        q = q if self.quantizer.channel_first else q.movedim(-1, 1)
        return (self._coder()[1](q) * 0.5 + 0.5).clamp(0.0, 1.0)

    @torch.no_grad()
    def code_statistics(self, loader) -> dict[str, list[float]]:
        """Usage (share of codes hit) and perplexity of each codebook over a whole data loader.

        Codebooks of more than 2^20 codes are not histogrammed and get no entry.
        """
        counts = None
        for batch in loader:
            codes = self.encode(batch[0] if isinstance(batch, (list, tuple)) else batch)
            batch_counts = [code_counts(codes[..., c], k) for c, k in enumerate(self.quantizer.spec.codebook_sizes)]
            counts = batch_counts if counts is None else [a + b for a, b in zip(counts, batch_counts)]
        per_codebook = [usage_metrics(c) for c in counts if c is not None]
        return {name: [m[name].item() for m in per_codebook] for name in ("usage", "perplexity")}

    def bits_per_image(self, codes_shape: tuple[int, ...]) -> int:
        """Exactly packed bits of one image's codes (B, h, w, C)."""
        tokens = math.prod(codes_shape[1:-1])
        return tokens * self.quantizer.spec.bits_per_token

    # -- training ----------------------------------------------------------------------
    def _recon_loss(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(recon, x) if self.hparams.recon_loss == "l1" else F.mse_loss(recon, x)

    def losses(self, batch, stage: str) -> Step:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        recon, out = self(x)
        rec = self._recon_loss(recon, x)
        log = {"rec_loss": rec, "quantizer_loss": out.loss}
        if self.perceptual is not None:
            log["perceptual_loss"] = self.perceptual(recon, x)
            rec = rec + self.hparams.perceptual_weight * log["perceptual_loss"]
        loss = rec + self.hparams.quantizer_weight * out.loss
        if stage == "train":
            self._optimize(x, recon, rec, loss, log)
            self.last_quantizer_metrics = out.metrics
        else:
            clamped = recon.clamp(0.0, 1.0)
            log["psnr"] = peak_signal_noise_ratio(clamped, x, data_range=1.0)
            log["ssim"] = structural_similarity_index_measure(clamped, x, data_range=1.0)
            for c, error in enumerate((clamped - x).mean((0, 2, 3))):  # a colour cast shows as a channel's bias
                log[f"mean_error_{c}"] = error
            log.update({k: v for k, v in out.metrics.items() if "/" not in k})
        log["loss"] = loss.detach()
        return Step(log, outputs={"recon": recon.detach(), "codes": out.codes})

    def _gan_active(self) -> bool:
        return self.discriminator is not None and self._batches_done() >= self.hparams.disc_start_step

    def gan_ramp(self) -> float:
        """The share of ``disc_weight`` the generator's GAN loss gets now: 0 before ``disc_start_step``, then a
        linear ramp to 1 over ``disc_warmup_steps`` batches."""
        done = self._batches_done() - self.hparams.disc_start_step
        if done < 0:
            return 0.0
        return min(1.0, (done + 1) / self.hparams.disc_warmup_steps) if self.hparams.disc_warmup_steps else 1.0

    def entropy_multiple(self) -> float:
        """How many times its ``entropy_loss_weight`` each BSQ/LFQ entropy term weighs now (entropy annealing)."""
        steps, factor = self.hparams.entropy_annealing_steps, self.hparams.entropy_annealing_factor
        if not steps:
            return 1.0
        return factor - (factor - 1.0) * min(1.0, self._batches_done() / steps)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if not self.entropy_weights:
            return
        multiple = self.entropy_multiple()
        modules = dict(self.quantizer.named_modules())
        for name, base in self.entropy_weights.items():
            modules[name].entropy_loss_weight = base * multiple

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """Move the averaged weights towards the live ones (decay warmed up as ``min(decay, (1 + n) / (10 + n))``
        after ``n`` batches, so early averages forget the random start); buffers are copied."""
        if self.ema is None:
            return
        n = self._batches_done()
        decay = min(self.hparams.ema_decay, (1.0 + n) / (10.0 + n))
        for name in ("encoder", "decoder"):
            live, average = getattr(self, name), self.ema[name]
            torch._foreach_lerp_(list(average.parameters()), list(live.parameters()), 1.0 - decay)
            for a, b in zip(average.buffers(), live.buffers()):
                a.copy_(b)

    def _batches_done(self) -> int:
        return self.trainer.fit_loop.epoch_loop.total_batch_idx if self._trainer is not None else 0

    def _optimize(self, x, recon, rec, loss, log) -> None:
        optimizers = self.optimizers()
        opt_g, opt_d = (optimizers, None) if self.discriminator is None else optimizers
        if self._gan_active():
            g_loss = hinge_g_loss(self.discriminator(recon))
            weight = (
                self.gan_ramp() * self.hparams.disc_weight * adaptive_gan_weight(rec, g_loss, self.decoder.last_layer)
            )
            loss = loss + weight * g_loss
            log.update({"g_loss": g_loss, "gan_weight": weight})
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.hparams.grad_clip > 0:
            self.clip_gradients(opt_g, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        self.lr_schedulers().step()
        if self._gan_active():
            d_loss = hinge_d_loss(self.discriminator(x), self.discriminator(recon.detach()))
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.optimizer.step()  # the raw optimizer: global_step keeps counting batches, not optimizer steps
            log["d_loss"] = d_loss

    def configure_optimizers(self):
        opt_g = self.make_optimizer(exclude=["discriminator", "perceptual", "ema"])
        scheduler = self.make_scheduler(opt_g)
        if self.discriminator is None:
            return [opt_g], [scheduler]
        opt_d = self.make_optimizer(self.discriminator, weight_decay=DISCRIMINATOR_WEIGHT_DECAY)
        return [opt_g, opt_d], [scheduler]

    # -- determinism on resume -------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])
