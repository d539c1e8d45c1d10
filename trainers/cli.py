"""``tokq``: one command line for training tokenizers and moving data to and from tokens.

    tokq fit --config configs/image/vq.yaml          # LightningCLI: fit / validate / test / predict
    tokq encode --ckpt last.ckpt --output tokens.safetensors [--split test]
    tokq decode --tokens tokens.safetensors --ckpt last.ckpt --output grid.png [--force]
    tokq export --ckpt last.ckpt --output tokenizer.safetensors   # a safe file to share; every verb takes it
    tokq fit --config configs/tokens/maskgit.yaml --data.init_args.train_tokens train.safetensors
    tokq sample --ckpt maskgit.ckpt --output samples.png [--labels 0 1 2]
    tokq fit --config configs/graph/tokenizer.yaml   # graph tokenizer; encode writes node tokens + PPR
    tokq inspect --tokens tokens.safetensors [--plot usage.png]   # codebook usage per codebook / RVQ level

The Lightning subcommands take any LightningModule / LightningDataModule by
``class_path`` (CSV logger by default; add ``--config configs/logger/wandb.yaml``
for wandb in offline mode). ``encode`` rebuilds the data module saved in the
checkpoint (override its root with ``--data-root``) and writes exactly packed
codes with their TokenSpec; ``decode`` turns a token file back into an image grid.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from tokenizers_q.trainers.artifacts import (
    ModuleFile,
    load_datamodule,
    load_module,
    load_token_model,
    load_tokenizer,
    read_module_file,
    tokenizer_fingerprint,
)
from tokenizers_q.trainers.autoencoder import AutoencoderModule

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
TOKEN_COMMANDS = ("encode", "decode", "sample", "inspect", "export")


def datamodule_from_checkpoint(source: str | Path | ModuleFile, overrides: dict):
    """The image data module an exported tokenizer or a checkpoint (or what :func:`read_module_file` read from
    one) was trained on, with ``overrides``."""
    from tokenizers_q.trainers.data import ImageDataModule

    return load_datamodule(source, ImageDataModule, overrides)


def sample_command(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="tokq sample", description="Sample images from a transformer on tokens.")
    parser.add_argument("--ckpt", required=True, help="exported or checkpointed MaskGIT or autoregressive token model")
    parser.add_argument(
        "--tokenizer", help="tokenizer export or checkpoint (default: the one that made the training tokens)"
    )
    parser.add_argument("--output", required=True, help="PNG grid to write")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--labels", type=int, nargs="+", help="classes, repeated to fill the grid (conditional models)")
    parser.add_argument("--temperature", type=float, help="override the model's sampling temperature")
    parser.add_argument("--steps", type=int, help="MaskGIT decoding steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="sample even if the tokenizer is not the one trained on")
    args = parser.parse_args(argv)

    from tokenizers_q.trainers.callbacks import save_image_grid
    from tokenizers_q.trainers.maskgit import MaskedTokenModule

    model = load_token_model(args.ckpt)
    tokenizer_path = args.tokenizer or model.hparams.tokenizer
    if tokenizer_path is None:
        raise ValueError(f"{args.ckpt} names no tokenizer: pass --tokenizer")
    tokenizer = load_tokenizer(tokenizer_path)
    check_fingerprint(
        model.hparams.get("tokenizer_fingerprint"), tokenizer, f"{args.ckpt} was trained on tokens made", args.force
    )
    labels = None
    if args.labels:
        labels = torch.tensor(args.labels).repeat(math.ceil(args.num_images / len(args.labels)))[: args.num_images]
    options = {"temperature": args.temperature}
    if isinstance(model, MaskedTokenModule):
        options["steps"] = args.steps
    torch.manual_seed(args.seed)
    images = model.sample_images(tokenizer, args.num_images, labels, **options)
    path = save_image_grid(images, Path(args.output), nrow=8)
    print(f"sampled {images.shape[0]} images with {type(model).__name__} to {path}")
    return path


def encode_split(model, data, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes (N, *grid, num_codebooks) of every image of a data module's split, and its labels (or None)."""
    codes, labels = [], []
    for batch in tqdm(data.dataloader(split), desc=f"encode {split}", unit="batch"):
        x, y = batch if isinstance(batch, (list, tuple)) else (batch, None)
        codes.append(model.encode(x))
        if y is not None:
            labels.append(torch.as_tensor(y))
    return torch.cat(codes), torch.cat(labels) if labels else None


def encode_command(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="tokq encode", description="Encode a data set to a token file.")
    parser.add_argument("--ckpt", required=True, help="exported tokenizer (tokq export) or a checkpoint of your run")
    parser.add_argument("--output", required=True, help="token file to write (.safetensors)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--data-root", help="override the data root stored in the checkpoint")
    parser.add_argument("--test-root", help="image tokenizers: a folder of held-out images as the test split")
    parser.add_argument("--batch-size", type=int, help="override the batch size")
    parser.add_argument("--graph", help="graph tokenizers: override the graph (csbm, ba_house or a .pt file)")
    parser.add_argument("--ppr-k", type=int, help="graph tokenizers: PPR neighbours stored per node")
    parser.add_argument("--ppr-alpha", type=float, help="graph tokenizers: PPR restart probability")
    parser.add_argument(
        "--features", action="store_true", help="graph tokenizers: also store node features (for ego_features)"
    )
    parser.add_argument(
        "--semantic-k", type=int, help="graph tokenizers: most feature-similar nodes stored per node (exact, N^2)"
    )
    args = parser.parse_args(argv)

    from tokenizers_q.packing import save_tokens

    file = read_module_file(args.ckpt)  # read once: the module and its data module are built from it
    model = load_module(file)
    if type(model).__name__ == "GraphTokenizerModule":
        return encode_graph(model, file, args)
    if not isinstance(model, AutoencoderModule):
        raise ValueError(f"{args.ckpt} holds a {type(model).__name__}, not an image or graph tokenizer")
    overrides = {"root": args.data_root, "batch_size": args.batch_size, "test_root": args.test_root}
    data = datamodule_from_checkpoint(file, overrides)
    codes_t, labels = encode_split(model, data, args.split)
    spec = model.quantizer.spec
    metadata = {
        "checkpoint": str(Path(args.ckpt).resolve()),
        "split": args.split,
        "quantizer": type(model.quantizer).__name__,
        "image_shape": list(data.splits[args.split][0][0].shape),
        "bits_per_image": model.bits_per_image(tuple(codes_t.shape)),
    }
    extras = None if labels is None else {"labels": labels}
    path = save_tokens(args.output, codes_t, spec, metadata, extras, tokenizer_fingerprint(model))
    print(
        f"wrote {codes_t.shape[0]} images as {tuple(codes_t.shape[1:-1])} tokens x {spec.num_codebooks} codebook(s), "
        f"{metadata['bits_per_image']} bits/image, to {path} ({path.stat().st_size} bytes)"
    )
    return path


def encode_graph(model, file: ModuleFile, args) -> Path:
    """``tokq encode`` for a graph tokenizer: every node's codes, labels, masks and PPR neighbours."""
    from tokenizers_q.trainers.graph_data import GraphDataModule
    from tokenizers_q.trainers.node_tokens import write_node_tokens

    data = load_datamodule(file, GraphDataModule, {"graph": args.graph})
    data.setup()
    k = args.ppr_k or data.hparams.ppr_k
    alpha = args.ppr_alpha or data.hparams.ppr_alpha
    semantic_k = args.semantic_k if args.semantic_k is not None else data.hparams.get("semantic_k", 0)
    metadata = {"checkpoint": str(Path(args.ckpt).resolve()), "graph": str(data.hparams.graph)}
    path = write_node_tokens(
        model, data.data, args.output, k, alpha, metadata, features=args.features, semantic_k=semantic_k
    )
    spec = model.quantizer.spec
    print(
        f"wrote {data.data.num_nodes} nodes x {spec.num_codebooks} codebook(s), {spec.bits_per_token} bits/node, "
        f"with their top-{k} PPR neighbours{f' and {semantic_k} similar nodes' if semantic_k else ''}, "
        f"to {path} ({path.stat().st_size} bytes)"
    )
    return path


def inspect_command(argv: list[str]) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(prog="tokq inspect", description="Codebook usage of a token file.")
    parser.add_argument("--tokens", required=True, help="token file written by tokq encode")
    parser.add_argument("--plot", help="also write a PNG of code frequencies per codebook")
    args = parser.parse_args(argv)

    from tokenizers_q.metrics import code_counts, usage_metrics
    from tokenizers_q.packing import load_tokens

    tokens = load_tokens(args.tokens)
    codes = tokens.codes.reshape(-1, tokens.spec.num_codebooks).long()
    counts = [code_counts(codes[:, c], k) for c, k in enumerate(tokens.spec.codebook_sizes)]
    kind = tokens.metadata.get("kind", "images")
    print(f"{args.tokens}: {tokens.codes.shape[0]} {kind}, codes {tuple(tokens.codes.shape[1:])}, {tokens.spec}")
    print("| codebook | size | bits | used | usage | perplexity |\n|---|---|---|---|---|---|")
    stats: dict[str, list[float]] = {"usage": [], "perplexity": []}
    for c, (size, bits, count) in enumerate(zip(tokens.spec.codebook_sizes, tokens.spec.bits, counts)):
        if count is None:
            print(f"| {c} | {size} | {bits} | - | too large to count | - |")
            continue
        m = usage_metrics(count)
        stats["usage"].append(m["usage"].item())
        stats["perplexity"].append(m["perplexity"].item())
        print(f"| {c} | {size} | {bits} | {int((count > 0).sum())} | {m['usage']:.1%} | {m['perplexity']:.1f} |")
    if args.plot:
        from tokenizers_q.trainers.callbacks import plot_code_counts

        print(f"wrote {plot_code_counts([c for c in counts if c is not None], Path(args.plot))}")
    return stats


def decode_command(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="tokq decode", description="Decode a token file to an image grid.")
    parser.add_argument("--tokens", required=True, help="token file written by tokq encode")
    parser.add_argument("--ckpt", required=True, help="the tokenizer (export or checkpoint) that made the tokens")
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--force", action="store_true", help="decode even if the tokens come from another tokenizer")
    args = parser.parse_args(argv)

    from tokenizers_q.packing import load_tokens
    from tokenizers_q.trainers.callbacks import save_image_grid

    tokens = load_tokens(args.tokens)
    if tokens.metadata.get("kind") == "nodes":
        raise ValueError(f"{args.tokens} holds node tokens, which decode to no image: see them with tokq inspect")
    model = load_tokenizer(args.ckpt)
    spec = model.quantizer.spec
    if tokens.spec != spec:
        raise ValueError(
            f"{args.tokens} holds tokens of {tokens.spec}, but the checkpoint's quantizer "
            f"({type(model.quantizer).__name__}) makes {spec}: decode with the tokenizer that encoded them"
        )
    check_fingerprint(tokens.fingerprint, model, f"{args.tokens} was encoded", args.force)
    images = model.decode(tokens.codes[: args.num_images])
    path = save_image_grid(images, Path(args.output), nrow=8)
    print(f"decoded {images.shape[0]} images to {path}")
    return path


def check_fingerprint(expected: str | None, tokenizer, what: str, force: bool) -> None:
    """Refuse (unless ``force``) a tokenizer whose fingerprint is not the one the tokens were made with."""
    if expected is None or force:
        return
    actual = tokenizer_fingerprint(tokenizer)
    if actual != expected:
        raise ValueError(
            f"{what} by another tokenizer (fingerprint {expected}, this tokenizer's is {actual}): its codes mean "
            "other things here. Use the tokenizer that made them, or pass --force to decode anyway"
        )


def export_command(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(
        prog="tokq export", description="Write a trained run as a safe artifact to share and use."
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint of your own run")
    parser.add_argument("--output", required=True, help="artifact to write (.safetensors)")
    args = parser.parse_args(argv)
    from tokenizers_q.trainers.artifacts import export_module

    path = export_module(args.ckpt, args.output)
    print(f"exported {args.ckpt} to {path} ({path.stat().st_size} bytes)")
    return path


def lightning_cli(argv: list[str] | None):
    """LightningCLI on any module and data module; ``--ckpt_path`` checkpoints are read with
    ``weights_only=True`` (no pickled code runs) unless ``--weights_only false`` is given."""
    import lightning as L
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    class SafeResumeParser(LightningArgumentParser):
        def add_method_arguments(self, *args, **kwargs):
            added = super().add_method_arguments(*args, **kwargs)
            if "weights_only" in added:
                self.set_defaults(weights_only=True)
            return added

    return LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
        },
        save_config_kwargs={"overwrite": True},
        parser_class=SafeResumeParser,
        args=argv,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tokq`` console script; ``argv`` defaults to the command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOKEN_COMMANDS:
        commands = {"encode": encode_command, "decode": decode_command, "sample": sample_command}
        commands["export"] = export_command
        {**commands, "inspect": inspect_command}[args[0]](args[1:])
        return
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: tokq {{{','.join(LIGHTNING_COMMANDS + TOKEN_COMMANDS)}}} ...  (tokq VERB --help for one)")
        print(__doc__)
        return
    lightning_cli(argv)


if __name__ == "__main__":
    main()
