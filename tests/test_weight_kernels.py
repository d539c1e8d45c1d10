"""Run-time layouts of quantized weights: torch's packed int4 / int8 kernels against dequantize-then-matmul."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenizers_q.memory import held_bytes
from tokenizers_q.weights import (
    GaussianGridConfig,
    IntGridConfig,
    KMeansConfig,
    NF4Config,
    RotatedConfig,
    TernaryConfig,
    VectorCodebookConfig,
    quantize_,
)
from tokenizers_q.weights.kernels import INT4_GROUP_SIZES, kernel_layout, layout_weight
from tokenizers_q.weights.modules import QuantizedLinear
from tokenizers_q.weights.quantize import load_quantized, save_quantized

needs_int4 = pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="this torch has no CPU int4 kernel"
)


def weight(rows=64, cols=256, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CONFIGS = [
    *(pytest.param(IntGridConfig(4, group_size=g), "int4pack", marks=needs_int4) for g in INT4_GROUP_SIZES),
    pytest.param(IntGridConfig(4, group_size=128, symmetric=False), "int4pack", marks=needs_int4),
    (IntGridConfig(8, granularity="channel"), "int8pack"),
    # rotated grids: the inner grid's kernel on rotated inputs (and outputs rotated back)
    pytest.param(RotatedConfig(IntGridConfig(4, group_size=64, symmetric=False)), "int4pack", marks=needs_int4),
    pytest.param(RotatedConfig(IntGridConfig(4, group_size=128), rotate_outputs=True), "int4pack", marks=needs_int4),
    (RotatedConfig(IntGridConfig(8, granularity="channel")), "int8pack"),
    (RotatedConfig(NF4Config(64)), None),
    (RotatedConfig(GaussianGridConfig(3, group_size=64), rotate_outputs=True), None),
    (IntGridConfig(8, granularity="channel", symmetric=False), None),
    (IntGridConfig(3, group_size=128), None),
    (IntGridConfig(2, granularity="tensor"), None),
    (NF4Config(64), None),
    (KMeansConfig(3), None),
    (TernaryConfig("channel"), None),
    (VectorCodebookConfig(group_size=4, codebook_size=16, num_quantizers=2, kmeans_iters=3), None),
]


ROW_CONFIGS = [
    IntGridConfig(3, group_size=50, symmetric=False),
    IntGridConfig(4, granularity="tensor"),
    NF4Config(50),
    KMeansConfig(3, kmeans_iters=3),
    TernaryConfig(),
    VectorCodebookConfig(group_size=5, codebook_size=8, num_quantizers=2, kmeans_iters=3),
]


@pytest.mark.parametrize("config", ROW_CONFIGS, ids=str)
@pytest.mark.parametrize("columns", [200, 250])  # 250 x 3 bits: rows that do not start on whole bytes
def test_any_block_of_rows_dequantizes_like_the_whole_matrix(config, columns):
    w = weight(40, columns)
    tensors = config.quantize(w)
    whole = config.dequantize(tensors, (40, columns))
    for start, stop in ((0, 40), (0, 1), (7, 23), (39, 40)):
        assert torch.equal(config.dequantize_rows(tensors, (40, columns), start, stop), whole[start:stop])


@pytest.mark.parametrize("config, layout", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_layout_matches_dequantize_then_matmul(config, layout, dtype):
    w = weight()
    codes = config.quantize(w)
    reference = config.dequantize(codes, tuple(w.shape))  # the codes layout, as saved before kernels
    layer = QuantizedLinear(tuple(w.shape), config, codes, bias=torch.randn(64))
    assert layer.layout == layout
    # the kernel layout holds the same weights (int4: scales rounded to bfloat16)
    tolerance = 4e-3 if layout == "int4pack" else 0.0
    assert relative(layer.dequantized(), reference) <= tolerance
    transposed = torch.randn(256, 6, generator=torch.Generator().manual_seed(2)).to(dtype).t()  # not contiguous
    for lead, x in (((3, 5), None), ((70,), None), ((6,), transposed)):  # few rows and many, strided inputs
        x = torch.randn(*lead, 256, generator=torch.Generator().manual_seed(1)).to(dtype) if x is None else x
        expected = x.float() @ layer.dequantized().T + layer.bias
        out = layer(x)
        assert out.dtype == dtype and out.shape == (*lead, 64)
        # bfloat16 activations inside the kernels, or in the input itself
        assert relative(out, expected) < (1e-5 if layout is None and dtype == torch.float32 else 1e-2)


@needs_int4
def test_int4_layout_is_exact_on_its_own_weights():
    config = IntGridConfig(4, group_size=64, symmetric=False)
    w = weight(128, 512)
    layer = QuantizedLinear((128, 512), config, config.quantize(w))
    x = torch.randn(4, 512).to(torch.bfloat16)
    exact = (x.double() @ layer.dequantized().double().T).float()
    assert relative(layer(x), exact) < 1e-2
    # the nibbles come back to the grid levels: a weight's dequantized value lies on its group's grid
    tensors = {n: getattr(layer, n) for n in layer.stored}
    scales = tensors["scales_and_zeros"].float()[..., 0].t().repeat_interleave(64, 1)
    zeros = tensors["scales_and_zeros"].float()[..., 1].t().repeat_interleave(64, 1)
    levels = (layout_weight("int4pack", tensors, (128, 512)) - zeros) / scales + 8
    assert torch.allclose(levels, levels.round(), atol=1e-3) and levels.min() >= 0 and levels.max() <= 15


@pytest.mark.parametrize(
    "config", [pytest.param(IntGridConfig(4, group_size=128), marks=needs_int4), IntGridConfig(8, "channel")], ids=str
)
def test_kernel_layouts_hold_their_counted_bytes_and_survive_files(config, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).eval()
    quantize_(model, config, progress=False, verbose=False)
    x = torch.randn(7, 256)
    before = model(x)
    for layer in (model[0], model[2]):
        assert layer.layout is not None and layer._cached is None  # no float copy of the weight after forwards
        counted = layer.bits_per_weight() * layer.shape[0] * layer.shape[1] / 8
        bias = layer.bias.numel() * 4
        assert held_bytes(layer) <= 1.05 * counted + bias
    path = save_quantized(model, tmp_path / "model.safetensors")
    fresh = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).eval()
    restored = load_quantized(fresh, path)
    assert restored[0].layout == model[0].layout
    assert torch.equal(restored(x), before)


@pytest.mark.parametrize("config, layout", CONFIGS, ids=str)
def test_every_method_holds_only_its_counted_bytes_after_forwards(config, layout):
    layer = QuantizedLinear((64, 256), config, config.quantize(weight()), bias=torch.zeros(64))
    for batch in (1, 9):
        layer(torch.randn(batch, 256))
    counted = layer.bits_per_weight() * 64 * 256 / 8
    assert held_bytes(layer) <= 1.05 * counted + 64 * 4 and layer._cached is None


def test_blocked_matmul_never_holds_the_float_weight(monkeypatch):
    import tokenizers_q.weights.modules as modules

    monkeypatch.setattr(modules, "BLOCK_WEIGHTS", 256 * 16)  # 16 rows a block
    config = NF4Config(64)
    layer = QuantizedLinear((100, 256), config, config.quantize(weight(100, 256)))
    x = torch.randn(2, 256)
    expected = x @ config.dequantize({n: getattr(layer, n) for n in layer.stored}, (100, 256)).T
    shapes = []
    original = config.dequantize
    monkeypatch.setattr(type(config), "dequantize", lambda self, t, shape: shapes.append(shape) or original(t, shape))
    assert relative(layer(x), expected) < 1e-5
    assert shapes == [(min(100, i + 16) - i, 256) for i in range(0, 100, 16)] and layer._cached is None


@pytest.mark.parametrize(
    "config", [NF4Config(64), IntGridConfig(8, "channel"), pytest.param(IntGridConfig(4), marks=needs_int4)], ids=str
)
def test_gradients_reach_the_input_through_every_path(config):
    layer = QuantizedLinear((64, 256), config, config.quantize(weight()))
    x = torch.randn(3, 256, requires_grad=True)
    layer(x).sum().backward()
    expected = layer.dequantized().sum(0).expand(3, -1)
    assert relative(x.grad, expected) < (1e-5 if layer.layout is None else 1e-2)


def test_layouts_are_chosen_only_where_the_kernels_apply():
    cpu = torch.device("cpu")
    assert kernel_layout(IntGridConfig(4, group_size=100), (64, 300), cpu) is None
    assert kernel_layout(IntGridConfig(4, group_size=128), (60, 256), cpu) is None  # rows not a multiple of 8
    assert kernel_layout(IntGridConfig(4, granularity="channel"), (64, 256), cpu) is None
    assert kernel_layout(IntGridConfig(8, granularity="group"), (64, 256), cpu) is None
    assert kernel_layout(NF4Config(), (64, 256), cpu) is None
    assert kernel_layout(IntGridConfig(4, group_size=128), (64, 256), torch.device("meta")) is None
    # the user who asks to cache the float weight keeps the codes layout
    config = IntGridConfig(8, granularity="channel")
    assert QuantizedLinear((64, 256), config, config.quantize(weight()), cache_weight=True).layout is None


@pytest.mark.parametrize("config", [*ROW_CONFIGS, IntGridConfig(4, group_size=50)], ids=str)
@pytest.mark.parametrize("columns", [200, 250])  # 250: some methods' rows do not start on whole bytes
def test_embeddings_dequantize_only_the_rows_they_look_up(config, columns, monkeypatch):
    from tokenizers_q.weights.modules import QuantizedEmbedding

    table = weight(300, columns)
    layer = QuantizedEmbedding((300, columns), config, config.quantize(table))
    ids = torch.tensor([[5, 299, 5], [0, 17, 5]])
    expected = torch.nn.functional.embedding(ids, layer.dequantized())
    shapes = []
    original = type(config).dequantize

    def recorded(self, t, shape):
        shapes.append(shape)
        return original(self, t, shape)

    monkeypatch.setattr(type(config), "dequantize", recorded)
    assert torch.equal(layer(ids), expected)
    aligned = config.row_code_bits(columns) % 8 == 0  # then only the 4 distinct ids are dequantized
    assert shapes == ([(4, columns)] if aligned else [(300, columns)])
    with pytest.raises(IndexError, match="embedding id 300 is out of range for 300 rows"):
        layer(torch.tensor([1, 300]))


COMPILED_CONFIGS = [
    NF4Config(64),
    IntGridConfig(3, group_size=128, symmetric=False),
    IntGridConfig(2, granularity="tensor"),
    KMeansConfig(3, kmeans_iters=3),
    TernaryConfig("channel"),
    VectorCodebookConfig(group_size=4, codebook_size=16, num_quantizers=2, kmeans_iters=3),
]


@pytest.mark.parametrize("config", COMPILED_CONFIGS, ids=str)
def test_compiled_dequantization_matches_eager(config, monkeypatch):
    import tokenizers_q.weights.modules as modules

    monkeypatch.setattr(modules, "BLOCK_WEIGHTS", 256 * 24)  # 24-row blocks, a shorter last one
    layer = QuantizedLinear((64, 256), config, config.quantize(weight()))
    inputs = {1: torch.randn(1, 256), 5: torch.randn(5, 256)}
    eager = {rows: layer(x) for rows, x in inputs.items()}
    tensors = {n: getattr(layer, n) for n in layer.stored}
    assert relative(config.vector_product(tensors, (64, 256), inputs[1]), eager[1][0]) < 1e-5
    calls = []
    real = modules.Compiled.__call__
    monkeypatch.setattr(modules.Compiled, "__call__", lambda self, f, *a: calls.append(f) or real(self, f, *a))
    layer.compile_dequantize = True
    for rows, x in inputs.items():
        assert relative(layer(x), eager[rows]) < 1e-5, rows
    assert calls == [modules._vector_product] + [modules._dequantized] * 3  # one row fused; 3 blocks of rows
    assert modules._COMPILED.failed is None


def test_compiled_dequantization_in_bfloat16_and_at_unaligned_widths():
    config = IntGridConfig(3, group_size=50)  # 250 x 3 bits: rows that do not start on whole bytes
    layer = QuantizedLinear((40, 250), config, config.quantize(weight(40, 250)))
    reference = layer.dequantized()
    layer.compile_dequantize = True
    for x in (torch.randn(1, 250), torch.randn(3, 250)):
        assert relative(layer(x), x @ reference.T) < 1e-5
        assert relative(layer(x.bfloat16()), x @ reference.T) < 1e-2 and layer(x.bfloat16()).dtype == torch.bfloat16


def test_a_failed_compile_warns_and_runs_eager(monkeypatch):
    import tokenizers_q.weights.modules as modules

    def no_compiler(function, **options):
        def fails(*args):
            raise OSError("no C++ compiler found")

        return fails

    monkeypatch.setattr(modules, "_COMPILED", modules.Compiled("quantized matmuls", dynamic=False))
    monkeypatch.setattr(torch, "compile", no_compiler)
    config = NF4Config(64)
    layer = QuantizedLinear((64, 256), config, config.quantize(weight()))
    layer.compile_dequantize = True
    x = torch.randn(1, 256)
    with pytest.warns(UserWarning, match="torch.compile of quantized matmuls failed; eager from now on: no C"):
        out = layer(x)
    assert relative(out, x @ layer.dequantized().T) < 1e-5
    assert "no C++ compiler" in modules._COMPILED.failed and relative(layer(x), out) == 0  # no second try
