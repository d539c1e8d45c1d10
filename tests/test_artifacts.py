"""Files from others run no code: malicious checkpoints and artifacts given to every loader and CLI verb."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tokenizers_q.files import write_artifact
from tokenizers_q.instantiate import instantiate, resolve_class
from tokenizers_q.trainers.artifacts import (
    FORMAT,
    MODULE_CLASS_KEY,
    VERSION,
    export_module,
    load_graph_tokenizer,
    load_kv_tokenizer,
    load_module,
    load_token_model,
    load_tokenizer,
)
from tokenizers_q.trainers.autoencoder import AutoencoderModule
from tokenizers_q.trainers.cli import datamodule_from_checkpoint
from tokenizers_q.trainers.cli import main as tokq


class MarkerPayload:
    """A pickle that creates ``marker`` when it is unpickled by ``torch.load(weights_only=False)``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def touch(marker) -> dict:
    """A class_path config that would create ``marker`` if it were built."""
    return {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}}


def good_checkpoint(trained) -> dict:
    return torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def malicious_checkpoints(trained, folder, marker) -> dict[str, tuple]:
    """name -> (path, the message each loader must raise)."""
    good = good_checkpoint(trained)
    cases = {}

    pickled = copy.deepcopy(good)
    pickled["payload"] = MarkerPayload(marker)
    cases["pickle"] = (pickled, "could not be loaded safely")

    top = copy.deepcopy(good)
    top["hyper_parameters"] = {"_class_path": "subprocess.Popen", "args": ["touch", str(marker)]}
    cases["class_path"] = (top, "refusing class_path 'subprocess.Popen'")

    nested = copy.deepcopy(good)
    nested["hyper_parameters"]["quantizer"] = touch(marker)
    # loaders of another kind refuse it sooner, by its top class
    cases["nested class_path"] = (nested, "refusing class_path 'subprocess.Popen'|holds AutoencoderModule, not")

    foreign = copy.deepcopy(good)
    foreign["hyper_parameters"]["_class_path"] = "tokenizers_q.trainers.artifacts.Path"  # pathlib, re-exported
    cases["re-exported class"] = (foreign, "it is not a class defined under")

    data = copy.deepcopy(good)
    data["datamodule_hyper_parameters"] = {"_class_path": "subprocess.Popen", "args": ["touch", str(marker)]}
    cases["datamodule class_path"] = (data, "refusing class_path 'subprocess.Popen'")

    paths = {}
    for i, (name, (ckpt, message)) in enumerate(cases.items()):
        path = folder / f"case{i}.ckpt"
        torch.save(ckpt, path)
        paths[name] = (path, message)
    return paths


def loaders(tokens, tmp_path) -> dict:
    """Every function and tokq verb that loads a model a user points it at, as ``name -> call(path)``."""
    out = str(tmp_path / "out.png")
    return {
        "load_tokenizer": load_tokenizer,
        "load_token_model": load_token_model,
        "load_graph_tokenizer": load_graph_tokenizer,
        "load_kv_tokenizer": load_kv_tokenizer,
        "load_module": load_module,
        "datamodule_from_checkpoint": lambda p: datamodule_from_checkpoint(p, {}),
        "export_module": lambda p: export_module(p, tmp_path / "exported.safetensors"),
        "tokq encode": lambda p: tokq(["encode", "--ckpt", str(p), "--output", str(tmp_path / "t.safetensors")]),
        "tokq decode": lambda p: tokq(["decode", "--tokens", str(tokens), "--ckpt", str(p), "--output", out]),
        "tokq sample": lambda p: tokq(["sample", "--ckpt", str(p), "--output", out]),
        "tokq sample --tokenizer": lambda p: tokq(["sample", "--ckpt", str(p), "--tokenizer", str(p), "--output", out]),
        "tokq export": lambda p: tokq(["export", "--ckpt", str(p), "--output", str(tmp_path / "e.safetensors")]),
    }


def test_malicious_checkpoints_run_nothing_in_any_loader(trained, tmp_path):
    marker = tmp_path / "pwned"
    tokens = tmp_path / "tokens.safetensors"
    tokq(["encode", "--ckpt", str(trained / "checkpoints" / "last.ckpt"), "--output", str(tokens)])
    cases = malicious_checkpoints(trained, tmp_path, marker)
    for loader_name, load in loaders(tokens, tmp_path).items():
        for case, (path, message) in cases.items():
            rebuilds_data = loader_name in ("datamodule_from_checkpoint", "tokq encode")
            if case == "datamodule class_path" and not rebuilds_data:
                continue  # the data settings are read only where the data is rebuilt
            if loader_name == "datamodule_from_checkpoint" and case not in ("pickle", "datamodule class_path"):
                continue  # it builds no module
            with pytest.raises(ValueError, match=message):
                load(path)
            assert not marker.exists(), f"{loader_name} ran code from a {case} checkpoint"
    assert not (tmp_path / "exported.safetensors").exists() and not (tmp_path / "e.safetensors").exists()


def test_resuming_through_tokq_reads_checkpoints_without_pickle(trained, tmp_path):
    marker = tmp_path / "pwned"
    path, _ = malicious_checkpoints(trained, tmp_path, marker)["pickle"]
    config = trained / "config.yaml"
    with pytest.raises(Exception, match="Weights only load failed"):
        tokq(["fit", "--config", str(config), "--ckpt_path", str(path), "--trainer.logger", "false"])
    assert not marker.exists()
    # the user's own checkpoint resumes as before
    last = trained / "checkpoints" / "last.ckpt"
    tokq(["validate", "--config", str(config), "--ckpt_path", str(last), "--trainer.logger", "false"])


def test_malicious_artifacts_run_nothing(trained, tmp_path):
    marker = tmp_path / "pwned"
    exported = export_module(trained / "checkpoints" / "last.ckpt", tmp_path / "good.safetensors")
    good = load_tokenizer(exported)
    module = {"class_path": "tokenizers_q.trainers.AutoencoderModule", "init_args": {}}
    cases = {
        "class_path": {"module": touch(marker), "datamodule": None},
        "nested class_path": {"module": {**module, "init_args": {"quantizer": touch(marker)}}, "datamodule": None},
        "datamodule": {"module": module, "datamodule": touch(marker)},
    }
    for name, config in cases.items():
        path = write_artifact(tmp_path / f"{name}.safetensors", FORMAT, VERSION, config, good.state_dict())
        with pytest.raises(ValueError, match="refusing class_path 'subprocess.Popen'"):
            if name == "datamodule":
                datamodule_from_checkpoint(path, {})
            else:
                load_tokenizer(path)
        assert not marker.exists(), name


def test_checkpoint_of_another_kind_is_refused_before_it_is_built(trained):
    from tokenizers_q.trainers.graph_tokenizer import GraphTokenizerModule

    with pytest.raises(ValueError, match="last.ckpt holds AutoencoderModule, not GraphTokenizerModule"):
        load_module(trained / "checkpoints" / "last.ckpt", GraphTokenizerModule)


def test_instantiate_builds_only_library_and_torch_nn_classes():
    vq = instantiate({"class_path": "tokenizers_q.VQ", "init_args": {"dim": 4, "codebook_size": 8}})
    assert type(vq).__name__ == "VQ" and vq.codebook_size == 8
    seq = instantiate({"class_path": "torch.nn.Sequential", "init_args": {}})
    assert isinstance(seq, nn.Sequential)
    nested = instantiate({"a": [{"class_path": "torch.nn.Identity"}], "b": 3})
    assert isinstance(nested["a"][0], nn.Identity) and nested["b"] == 3
    refused = {
        "os.system": "only public classes under tokenizers_q. or torch.nn.",
        "torchvision.models.resnet18": "only public classes under",
        "tokenizers_q.files.atomic_write": "it is not a class",
        "tokenizers_q.trainers.cli.Path": "it is not a class defined under",
        "tokenizers_q.quantizers.base._StraightThrough": "only public classes",
        "torch.nn.functional.relu": "it is not a class",
        "tokenizers_q.NoSuchThing": "names nothing that can be imported",
        "builtins": "must be a dotted",
        3: "must be a dotted",
    }
    for class_path, message in refused.items():
        with pytest.raises(ValueError, match=message):
            resolve_class(class_path)
    with pytest.raises(ValueError, match="TokenSpec is not a subclass of Module"):
        resolve_class("tokenizers_q.TokenSpec")
    with pytest.raises(ValueError, match="takes only 'class_path' and 'init_args', got also \\['dict_kwargs'\\]"):
        instantiate({"class_path": "torch.nn.Identity", "dict_kwargs": {}})
    with pytest.raises(ValueError, match="VQ is not a subclass of AutoencoderModule"):
        instantiate(
            {"class_path": "tokenizers_q.VQ", "init_args": {"dim": 4, "codebook_size": 8}}, (AutoencoderModule,)
        )


def test_a_checkpoint_of_parts_built_in_python_says_why_it_cannot_be_rebuilt(tmp_path):
    import lightning as L

    from tokenizers_q import VQ
    from tokenizers_q.models import Decoder, Encoder

    parts = dict(
        encoder=Encoder(in_channels=1, base_channels=8, channel_mult=[1, 2], latent_dim=8),
        decoder=Decoder(out_channels=1, base_channels=8, channel_mult=[1, 2], latent_dim=8),
        quantizer=VQ(dim=8, codebook_size=16, channel_first=True),
    )
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.strategy.connect(AutoencoderModule(**parts))
    trainer.save_checkpoint(tmp_path / "python.ckpt")
    with pytest.raises(ValueError, match="its config does not build AutoencoderModule .*missing.*'encoder'"):
        load_tokenizer(tmp_path / "python.ckpt")
    with pytest.raises(
        ValueError, match=r"the hyper-parameters \['encoder', 'decoder', 'quantizer'\] are module objects"
    ):
        export_module(AutoencoderModule(**parts), tmp_path / "python.safetensors")


def test_every_module_names_its_class_and_one_loader_rebuilds_it(tmp_path):
    """One tag key, written by every training module's on_save_checkpoint; load_module builds the class it names,
    from a checkpoint or an export, whatever the module."""
    import lightning as L

    from tokenizers_q.packing import TokenSpec
    from tokenizers_q.trainers import KVTokenizerModule, MaskedTokenModule

    modules = [
        KVTokenizerModule(num_layers=1, head_dim=8, quantizer="vq", quantizer_kwargs={"codebook_size": 4}),
        MaskedTokenModule(spec=TokenSpec((8,)).to_dict(), grid=[2, 2], dim=16, depth=1, num_heads=2),
    ]
    try:
        from tokenizers_q.trainers import GraphTokenizerModule, GraphTransformerModule

        modules.append(
            GraphTokenizerModule(in_dim=4, hidden_dim=8, latent_dim=8, quantizer_kwargs={"codebook_size": 4})
        )
        modules.append(GraphTransformerModule(spec=TokenSpec((8,)).to_dict(), num_classes=2, num_neighbours=1, dim=8))
    except ImportError:  # torch_geometric: the optional extra graph
        pass
    for i, module in enumerate(modules):
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.strategy.connect(module)
        ckpt = tmp_path / f"module{i}.ckpt"
        trainer.save_checkpoint(ckpt)
        cls = type(module)
        assert torch.load(ckpt, weights_only=True)[MODULE_CLASS_KEY] == f"{cls.__module__}.{cls.__qualname__}"
        exported = export_module(ckpt, tmp_path / f"module{i}.safetensors")
        for path in (ckpt, exported):
            loaded = load_module(path)
            assert type(loaded) is cls and not loaded.training
            for key, value in module.state_dict().items():
                assert torch.equal(loaded.state_dict()[key], value), (cls.__name__, key)


def test_a_checkpoint_naming_two_classes_is_refused(trained, tmp_path):
    ckpt = good_checkpoint(trained)
    ckpt[MODULE_CLASS_KEY] = "tokenizers_q.trainers.MaskedTokenModule"
    torch.save(ckpt, tmp_path / "two.ckpt")
    with pytest.raises(ValueError, match="two.ckpt names two module classes"):
        load_module(tmp_path / "two.ckpt")
