"""Transformers on tokens: heads from any TokenSpec, MaskGIT and autoregressive training and sampling."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import CONFIGS
from PIL import Image

from tokenizers_q import create_quantizer, save_tokens
from tokenizers_q.kv import KIVIConfig, KVCache
from tokenizers_q.models import TokenTransformer, codes_to_digits, digits_to_codes
from tokenizers_q.packing import TokenSpec
from tokenizers_q.trainers import AutoregressiveTokenModule, MaskedTokenModule, TokenDataModule, load_token_model
from tokenizers_q.trainers.artifacts import MODULE_CLASS_KEY, export_module, read_module_file
from tokenizers_q.trainers.cli import main as tokq

GRID = (3, 3)
SMALL = dict(dim=32, depth=2, num_heads=4, dropout=0.0)
SPECS = {name: create_quantizer(name, **kwargs).spec for name, kwargs in CONFIGS.items()}


def random_codes(spec: TokenSpec, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, k, (n, *GRID), generator=g) for k in spec.codebook_sizes], -1)


def module(cls, spec: TokenSpec, **kwargs):
    return cls(spec=spec.to_dict(), grid=list(GRID), **{**SMALL, **kwargs})


@pytest.mark.parametrize("name", sorted(SPECS))
def test_digits_round_trip(name):
    spec = SPECS[name]
    codes = random_codes(spec, 5)
    for factorised in (False, True):
        radices = TokenTransformer(spec, GRID, **SMALL, factorised=factorised).radices
        digits = codes_to_digits(codes, radices)
        assert all((digits[..., i] < r).all() for i, r in enumerate(r for rs in radices for r in rs))
        assert torch.equal(digits_to_codes(digits, radices), codes)


def test_heads_follow_the_spec():
    fsq, bsq, rvq = SPECS["fsq"], SPECS["bsq"], SPECS["rvq"]
    assert TokenTransformer(fsq, GRID, **SMALL).vocab == [fsq.codebook_sizes[0]]
    assert TokenTransformer(fsq, GRID, **SMALL, factorised=True).vocab == list(fsq.factors[0])  # one head per level
    assert TokenTransformer(bsq, GRID, **SMALL, factorised=True).vocab == [2] * 8  # one head per bit
    assert TokenTransformer(rvq, GRID, **SMALL).vocab == list(rvq.codebook_sizes)  # one head per level


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("factorised", [False, True])
def test_sampling_gives_valid_codes_for_every_spec(name, factorised):
    spec = SPECS[name]
    torch.manual_seed(0)
    for cls, kwargs in ((MaskedTokenModule, {"steps": 3}), (AutoregressiveTokenModule, {})):
        model = module(cls, spec, factorised=factorised, num_classes=2).eval()
        codes = model.generate(4, torch.tensor([0, 1, 2, 1]), **kwargs)
        assert codes.shape == (4, *GRID, spec.num_codebooks)
        spec.check_codes(codes)


def fit_steps(model, codes, labels, steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        torch.manual_seed(len(losses))  # the same masks for every run
        loss = model._step((codes.flatten(1, -2), labels), "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cls", [MaskedTokenModule, AutoregressiveTokenModule])
@pytest.mark.parametrize("name", ["vq", "rvq", "bsq"])
def test_training_lowers_the_loss_on_a_fixed_batch(cls, name):
    spec = SPECS[name]
    torch.manual_seed(0)
    model = module(cls, spec, num_classes=2, factorised=name == "bsq")
    # each example repeats one random token: visible tokens (and the first one) give away the rest
    codes, labels = random_codes(spec, 8)[:, :1, :1].expand(-1, *GRID, -1).contiguous(), torch.arange(8) % 2
    with torch.no_grad():
        torch.manual_seed(99)
        before = model._step((codes.flatten(1, -2), labels), "val").item()
    fit_steps(model, codes, labels, 60)
    with torch.no_grad():
        torch.manual_seed(99)
        after = model._step((codes.flatten(1, -2), labels), "val").item()
    assert after < 0.7 * before


@pytest.mark.parametrize("name", ["vq", "pq", "fsq"])
def test_autoregressive_cache_samples_the_same_tokens(name):
    spec = SPECS[name]
    torch.manual_seed(0)
    model = module(AutoregressiveTokenModule, spec, num_classes=3)
    fit_steps(model, random_codes(spec, 8), torch.arange(8) % 3, 5)  # leave the random init behind
    model.eval()
    labels = torch.tensor([0, 1, 2, 3])
    cached = model.generate(4, labels, temperature=0, use_cache=True)
    recomputed = model.generate(4, labels, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)
    # greedy decoding picks, at each position, the argmax given the sampled prefix
    hidden = model.transformer(cached.flatten(1, -2)[:, :-1], model._labels(labels), causal=True)
    assert torch.equal(model.transformer.sample(model.transformer.logits(hidden), 0), cached.flatten(1, -2))


def test_autoregressive_sampling_with_a_compressed_kv_cache():
    spec = SPECS["vq"]
    torch.manual_seed(0)
    model = module(AutoregressiveTokenModule, spec, num_classes=3)
    fit_steps(model, random_codes(spec, 8), torch.arange(8) % 3, 5)
    model.eval()
    labels = torch.tensor([0, 1, 2, 3])
    reference = model.generate(4, labels, temperature=0)
    kivi8 = KVCache(KIVIConfig(key_bits=8, value_bits=8, group_size=4, window=4).make_layer)
    assert torch.equal(model.generate(4, labels, temperature=0, cache=kivi8), reference)
    assert len(kivi8) == len(model.transformer.blocks) and kivi8.layers[0].quantized_tokens  # it really quantized
    assert 8 < kivi8.bits_per_element() < 32
    kivi1 = KVCache(KIVIConfig(key_bits=1, value_bits=1, group_size=4, window=0).make_layer)
    assert not torch.equal(model.generate(4, labels, temperature=0, cache=kivi1), reference)  # the cache is used
    with pytest.raises(ValueError, match="cache must be an empty KVCache"):
        model.generate(4, labels, temperature=0, cache=kivi8)


def test_maskgit_fills_every_position_in_the_configured_steps():
    spec = SPECS["vq"]
    torch.manual_seed(0)
    model = module(MaskedTokenModule, spec).eval()
    calls, masked_counts = [], []
    model.transformer.register_forward_hook(lambda m, args, kwargs, out: calls.append(1), with_kwargs=True)
    model.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: masked_counts.append(kwargs["mask"].sum(1).tolist()), with_kwargs=True
    )
    for steps in (1, 4, 9):
        calls.clear()
        masked_counts.clear()
        codes = model.generate(5, steps=steps)
        assert len(calls) == steps
        assert masked_counts[0] == [9] * 5  # starts fully masked
        assert all(a > b for prev, nxt in zip(masked_counts, masked_counts[1:]) for a, b in zip(prev, nxt))
        spec.check_codes(codes)


def test_random_mask_follows_the_cosine_schedule():
    model = module(MaskedTokenModule, SPECS["vq"])
    torch.manual_seed(0)
    counts = model.random_mask(4000).sum(1).float()
    assert counts.min() >= 1 and counts.max() <= 9
    # E[ceil(9 cos(pi u / 2))] for u ~ U(0, 1)
    u = torch.linspace(0, 1, 100001)
    expected = (9 * torch.cos(u * torch.pi / 2)).ceil().clamp(1, 9).mean()
    assert abs(counts.mean() - expected) < 0.1


def test_embeddings_from_the_codebook():
    vq = create_quantizer("vq", dim=8, codebook_size=16, kmeans_init=False)
    vq.codebook.embed[3] = vq.codebook.embed[5]
    model = module(MaskedTokenModule, vq.spec)
    model.transformer.init_embeddings_from(vq.code_vectors())
    weight = model.transformer.embed[0].weight
    assert torch.equal(weight[3], weight[5]) and abs(weight.std().item() - 0.02) < 1e-3
    rvq = create_quantizer("rvq", dim=8, num_quantizers=2, codebook_size=4)
    assert [v.shape for v in rvq.code_vectors()] == [(4, 8), (4, 8)]
    with pytest.raises(ValueError, match="factorised=False"):
        module(MaskedTokenModule, SPECS["bsq"], factorised=True).transformer.init_embeddings_from([])
    with pytest.raises(ValueError, match="code vectors of 2 codebooks, expected 1"):
        model.transformer.init_embeddings_from(rvq.code_vectors())


def test_transformer_errors():
    spec = SPECS["vq"]
    with pytest.raises(ValueError, match="grid must be"):
        TokenTransformer(spec, (), **SMALL)
    with pytest.raises(ValueError, match="positions must be one of"):
        TokenTransformer(spec, GRID, **SMALL, positions="rope")
    with pytest.raises(ValueError, match=r"dim \(30\) must be divisible by num_heads \(4\)"):
        TokenTransformer(spec, GRID, dim=30, num_heads=4)
    with pytest.raises(TypeError, match=r"num_heads must be an int, got 4.0 \(float\)"):
        TokenTransformer(spec, GRID, dim=32, num_heads=4.0)
    with pytest.raises(ValueError, match="num_classes must be a non-negative int, got -1"):
        TokenTransformer(spec, GRID, **SMALL, num_classes=-1)
    with pytest.raises(ValueError, match="top_k must be a non-negative int, got -1"):
        module(AutoregressiveTokenModule, spec, top_k=-1)
    with pytest.raises(ValueError, match="sample_steps must be a positive int, got 0"):
        module(MaskedTokenModule, spec, sample_steps=0)
    model = TokenTransformer(spec, GRID, **SMALL, num_classes=2)
    with pytest.raises(ValueError, match="labels must be in"):
        model(random_codes(spec, 2).flatten(1, -2), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"10 tokens exceed the grid \(3, 3\)"):
        model(torch.zeros(1, 10, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range|must be in"):
        model(torch.full((1, 9, 1), 32, dtype=torch.long))
    with pytest.raises(ValueError, match="token layout is unknown"):
        MaskedTokenModule(**SMALL).configure_model()
    with pytest.raises(ValueError, match=r"expected codes \(B, 9, num_codebooks\)"):
        module(AutoregressiveTokenModule, spec)._step((torch.zeros(2, 4, 1, dtype=torch.long), None), "train")


# -- data and the CLI ----------------------------------------------------------------------------
def write_token_file(path, spec, n, seed=0, labels=True):
    codes = random_codes(spec, n, seed)
    # a learnable structure: the second row copies the first
    codes[:, 1] = codes[:, 0]
    extras = {"labels": torch.arange(n) % 3} if labels else None
    return save_tokens(path, codes, spec, {"checkpoint": None}, extras)


def test_token_data_module(tmp_path):
    spec = SPECS["rvq"]
    train = write_token_file(tmp_path / "train.safetensors", spec, 40)
    data = TokenDataModule(str(train), val_fraction=0.25, batch_size=8)
    data.setup()
    assert data.spec == spec and data.grid == GRID
    assert len(data.splits["train"]) == 30 and len(data.splits["val"]) == 10
    codes, labels = next(iter(data.dataloader("val")))
    assert codes.shape == (8, 9, spec.num_codebooks) and labels.dtype == torch.long
    other = write_token_file(tmp_path / "other.safetensors", SPECS["vq"], 10)
    with pytest.raises(ValueError, match="but the training file"):
        TokenDataModule(str(train), val_tokens=str(other)).setup()
    with pytest.raises(ValueError, match="no test tokens"):
        data.dataloader("test")
    with pytest.raises(FileNotFoundError, match="no token file"):
        TokenDataModule(str(tmp_path / "missing.safetensors")).setup()


@pytest.mark.parametrize("cls", [MaskedTokenModule, AutoregressiveTokenModule])
def test_fit_reads_the_layout_from_the_data_and_checkpoints_rebuild(cls, tmp_path):
    spec = SPECS["pq"]
    train = write_token_file(tmp_path / "train.safetensors", spec, 48)
    L.seed_everything(0)
    model = cls(num_classes=3, **SMALL)
    trainer = L.Trainer(max_steps=12, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(model, TokenDataModule(str(train), batch_size=8))
    assert model.transformer.spec == spec and model.hparams.grid == list(GRID)
    ckpt = trainer.checkpoint_callback.best_model_path
    restored = load_token_model(ckpt)
    assert type(restored) is cls
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_checkpoints_saved_with_heads_still_load(tmp_path):
    model = module(AutoregressiveTokenModule, SPECS["rvq"], num_classes=2)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    assert checkpoint[MODULE_CLASS_KEY] == "tokenizers_q.trainers.autoregressive.AutoregressiveTokenModule"
    hparams = checkpoint["hyper_parameters"]
    hparams["heads"] = hparams.pop("num_heads")  # as checkpoints were saved before the renaming
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.warns(DeprecationWarning, match=r"old.ckpt .*renamed arguments \(heads -> num_heads\)"):
        restored = load_token_model(tmp_path / "old.ckpt")
    assert restored.hparams.num_heads == 4 and "heads" not in restored.hparams
    assert restored.transformer.blocks[0].attn.num_heads == 4
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    with pytest.warns(DeprecationWarning, match="heads -> num_heads"):
        exported = export_module(tmp_path / "old.ckpt", tmp_path / "model.safetensors")
    assert read_module_file(exported).module["init_args"]["num_heads"] == 4  # exports carry the current name


def test_one_weight_decay_rule():
    from tokenizers_q.trainers.module import weight_decay_groups

    model = module(MaskedTokenModule, SPECS["vq"], num_classes=2)
    decay, no_decay = weight_decay_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept
    # weight matrices of linear layers decay; embeddings (tables, positions, the mask and prefix), norms and
    # biases do not
    assert all(n.endswith(".weight") and ("qkv" in n or "out" in n or "mlp" in n or "heads" in n) for n in decayed)
    for name in ("transformer.prefix.weight", "transformer.embed.0.weight", "transformer.mask_embed"):
        assert name in kept
    assert "transformer.position.0" in kept and "transformer.norm.weight" in kept
    assert "transformer.blocks.0.attn.qkv.bias" in kept and "transformer.blocks.0.attn.qkv.weight" in decayed
    optimizer = model.configure_optimizers()[0][0]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]


def test_cli_fit_and_sample_through_a_tokenizer(trained, other_vq, tmp_path):
    # the tokens of a real (tiny) tokenizer, written by tokq encode, with labels and the checkpoint path
    tokens = tmp_path / "train.safetensors"
    tokq(["encode", "--ckpt", str(trained / "checkpoints" / "last.ckpt"), "--output", str(tokens), "--split", "train"])
    out = tmp_path / "runs"
    args = ["fit", "--config", "configs/tokens/maskgit.yaml", "--data.init_args.train_tokens", str(tokens)]
    args += [
        "--trainer.max_steps",
        "3",
        "--trainer.default_root_dir",
        str(out),
        "--trainer.enable_progress_bar",
        "false",
    ]
    args += ["--trainer.logger.init_args.save_dir", str(out), "--data.init_args.batch_size", "8"]
    args += ["--model.init_args.dim", "32", "--model.init_args.depth", "1", "--model.init_args.num_heads", "4"]
    args += ["--model.init_args.num_classes", "2", "--model.init_args.init_from_codebook", "true"]
    args += ["--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1"]
    tokq(args)
    ckpt = next(out.rglob("last.ckpt"))
    with Image.open(next(out.rglob("samples/latest.png"))) as im:  # SampleGrid: two rows of classes
        assert im.size == (20 * 17 + 1, 2 * 17 + 1)

    def sample(model, output, *extra):
        args = ["sample", "--ckpt", str(model), "--output", str(output), "--num-images", "6", "--labels", "0", "1"]
        tokq([*args, "--steps", "2", *extra])
        return output

    grid = sample(ckpt, tmp_path / "samples.png")
    with Image.open(grid) as im:
        assert im.size == (6 * 17 + 1, 18)  # 4x4 tokens decode to six 16x16 images in a row
    # exported token model and tokenizer: the same samples, no checkpoint needed
    model_file, tokenizer_file = tmp_path / "maskgit.safetensors", tmp_path / "tokenizer.safetensors"
    tokq(["export", "--ckpt", str(ckpt), "--output", str(model_file)])
    tokq(["export", "--ckpt", str(trained / "checkpoints" / "last.ckpt"), "--output", str(tokenizer_file)])
    exported = sample(model_file, tmp_path / "exported.png", "--tokenizer", str(tokenizer_file))
    assert exported.read_bytes() == grid.read_bytes()
    # a tokenizer of the same TokenSpec that did not make the training tokens is refused
    with pytest.raises(ValueError, match="was trained on tokens made by another tokenizer"):
        sample(model_file, tmp_path / "other.png", "--tokenizer", str(other_vq))
    assert sample(model_file, tmp_path / "other.png", "--tokenizer", str(other_vq), "--force").is_file()
    with pytest.raises(ValueError, match="last.ckpt holds AutoencoderModule, not TokenModule"):
        load_token_model(trained / "checkpoints" / "last.ckpt")
