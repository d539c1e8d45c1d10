"""Contract checks shared by the tests of every quantizer."""

from __future__ import annotations

import copy

import torch

from tokenizers_q import Quantizer, QuantizerOutput


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_quantizer(q: Quantizer, x: torch.Tensor, seed: int = 0) -> QuantizerOutput:
    """Check the quantizer contract on input ``x``; returns the training-mode output.

    Output shape and code dtype/range, no NaN, a scalar loss, straight-through
    gradient to ``x``, a gradient for every trainable parameter,
    ``decode(encode(x)) == forward(x).quantized`` in eval, eval and ``encode``
    leave every buffer unchanged, seeded determinism, and a ``state_dict``
    round trip into a fresh copy.
    """
    fresh = copy.deepcopy(q)  # untrained twin, for the determinism check
    spec = q.spec
    lead = x.movedim(1, -1).shape[:-1] if q.channel_first else x.shape[:-1]

    # training step: shapes, ranges, finiteness, gradients
    q.train()
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = q(x)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == x.shape and out.quantized.dtype == x.dtype
    assert out.codes.dtype == torch.long and out.codes.shape == (*lead, spec.num_codebooks)
    spec.check_codes(out.codes)
    assert torch.isfinite(out.quantized).all()
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert all(v.dim() == 0 and not v.requires_grad for v in out.metrics.values())
    weight = torch.randn_like(out.quantized)
    ((out.quantized * weight).sum() + out.loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in q.named_parameters():
        assert p.grad is not None, f"parameter {name} got no gradient"

    # eval: decode(encode(x)) reproduces forward, and nothing changes state
    q.eval()
    before = _buffers(q)
    with torch.no_grad():
        evaluated = q(x.detach())
        codes = q.encode(x.detach())
        decoded = q.decode(codes)
    assert torch.equal(codes, evaluated.codes)
    torch.testing.assert_close(decoded, evaluated.quantized, atol=1e-5, rtol=1e-5)
    q.train()
    q.encode(x.detach())  # encode in training mode must not update statistics either
    after = _buffers(q)
    for name in before:
        assert torch.equal(before[name], after[name]), f"buffer {name} changed in eval/encode"

    # the same seed gives the same output
    torch.manual_seed(seed)
    again = fresh(x.detach())
    torch.testing.assert_close(again.quantized, out.quantized.detach())
    assert torch.equal(again.codes, out.codes)

    # state_dict round trip into an untrained copy
    clone = copy.deepcopy(fresh)
    clone.load_state_dict(q.state_dict())
    clone.eval()
    q.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(x.detach()).quantized, q(x.detach()).quantized)
        assert torch.equal(clone.encode(x.detach()), q.encode(x.detach()))
    q.train()
    return out
