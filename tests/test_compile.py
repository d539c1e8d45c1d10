"""The forward path compiles with torch.compile into one graph and matches eager execution."""

import copy

import pytest
import torch

from tokenizers_q import FSQ, VQ


@pytest.mark.parametrize("make", [lambda: VQ(dim=16, codebook_size=64), lambda: FSQ(levels=[8, 5, 5], dim=16)])
def test_compiled_forward_matches_eager_in_train_and_eval(make):
    torch._dynamo.reset()
    eager = make()
    x = torch.randn(4, 32, 16)
    eager(x)  # the first training step runs k-means initialisation eagerly
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)

    for mode in ("train", "eval"):
        eager.train(mode == "train")
        compiled_module.train(mode == "train")
        batch = torch.randn(4, 32, 16, requires_grad=True)
        ref = eager(batch)
        out = compiled(batch)
        assert torch.equal(out.codes, ref.codes), mode
        torch.testing.assert_close(out.quantized, ref.quantized)
        torch.testing.assert_close(out.loss, ref.loss)
        (grad,) = torch.autograd.grad(out.quantized.sum() + out.loss, batch)
        (ref_grad,) = torch.autograd.grad(ref.quantized.sum() + ref.loss, batch)
        torch.testing.assert_close(grad, ref_grad)
    # EMA statistics updated inside the compiled graph equal the eager ones
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled_module.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
