"""Incoherence processing: any weight method applied to ``W R``, a randomized Hadamard rotation of the inputs."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers_q.checks import check_int
from tokenizers_q.hadamard import MAX_BLOCK, HadamardRotation, hadamard_rotation
from tokenizers_q.weights.config import WeightQuantConfig, register_weight_config


@register_weight_config("hadamard")
@dataclass(frozen=True)
class RotatedConfig(WeightQuantConfig):
    r"""Quantize ``W R`` with ``inner`` instead of ``W`` (QuIP#/QuaRot-style incoherence processing).

    ``R`` (:class:`~tokenizers_q.hadamard.HadamardRotation` of the input width, from ``seed``) is orthogonal,
    so ``W = (W R) R^T``: the rotated rows have no outlier columns and are near-Gaussian, which grids, NF4 and
    codebooks quantize with less error. GPTQ runs on the rotated problem (``R^T H R``). The stored tensors are
    ``inner``'s; ``R`` is rebuilt from the seed (nothing more is stored), and dequantizing applies ``R^T`` to
    each row.

    With ``rotate_outputs`` the rows are rotated as well (``R_out^T W R``, QuIP#'s two-sided incoherence):
    rows of very different norms then share their scale, and each stored row mixes a block of output
    channels (so the rows of an embedding table are no longer read alone).

    Args:
        inner: the method applied to the rotated weight, e.g. ``IntGridConfig(4, group_size=128, gptq=True)``
            (or its dict, as saved).
        seed: the rotation's random signs (the output rotation's are ``seed + 1``). Default: 0.
        max_block: largest Hadamard block. Default: 256.
        rotate_outputs: rotate the rows too. Default: False.
    """

    inner: WeightQuantConfig
    seed: int = 0
    max_block: int = MAX_BLOCK
    rotate_outputs: bool = False

    def __post_init__(self):
        if isinstance(self.inner, dict):
            object.__setattr__(self, "inner", WeightQuantConfig.from_dict(self.inner))
        if not isinstance(self.inner, WeightQuantConfig) or isinstance(self.inner, RotatedConfig):
            raise TypeError(f"inner must be a (non-rotated) WeightQuantConfig, got {self.inner!r}")
        check_int("seed", self.seed, 0)
        check_int("max_block", self.max_block)

    def rotation(self, width: int, outputs: bool = False) -> HadamardRotation:
        """The rotation of the inputs (of ``width``), or with ``outputs`` of the rows."""
        return hadamard_rotation(width, self.seed + outputs, self.max_block)

    @property
    def needs_hessian(self) -> bool:
        return self.inner.needs_hessian

    def to_dict(self) -> dict:
        fields = {"seed": self.seed, "max_block": self.max_block, "rotate_outputs": self.rotate_outputs}
        return {"method": self.method, "inner": self.inner.to_dict(), **fields}

    def quantize(self, weight, hessian=None):
        rotation = self.rotation(weight.shape[1])
        rotated = rotation.rotate(weight.float())
        if self.rotate_outputs:  # R_out^T W R
            rotated = self.rotation(weight.shape[0], outputs=True).rotate(rotated.T).T.contiguous()
        return self.inner.quantize(rotated, None if hessian is None else rotation.conjugate(hessian.float()))

    def dequantize(self, tensors, shape):
        weight = self.inner.dequantize(tensors, shape)
        if self.rotate_outputs:
            weight = self.rotation(shape[0], outputs=True).unrotate(weight.T).T
        return self.rotation(shape[1]).unrotate(weight)

    def vector_product(self, tensors, shape, x):
        product = self.inner.vector_product(tensors, shape, self.rotation(shape[1]).rotate(x))
        return self.rotation(shape[0], outputs=True).unrotate(product) if self.rotate_outputs else product

    def linear_parts(self, shape):
        """Rotate the inputs (and the outputs back), multiply by the inner method's ``W R`` (``R_out^T W R``)."""
        after = self.rotation(shape[0], outputs=True).unrotate if self.rotate_outputs else None
        return self.rotation(shape[1]).rotate, self.inner, after

    def row_tensors(self):
        return self.inner.row_tensors()

    def row_code_bits(self, columns):
        return self.inner.row_code_bits(columns)

    def select_rows(self, tensors, shape, rows):
        return None if self.rotate_outputs else self.inner.select_rows(tensors, shape, rows)
