"""Train the default image tokenizer on Fashion-MNIST for a few minutes, then report on the test set.

    python scripts/demo_image.py [--config configs/image/vq.yaml] [--max-steps 600] [--root DIR]

Prints test PSNR / SSIM, the share of the codebook used on the test set, the
exact bits per image, and the paths of the reconstruction and usage PNGs.
"""

from __future__ import annotations

import argparse
import math
import time

from tokenizers_q.trainers.callbacks import run_dir
from tokenizers_q.trainers.cli import lightning_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/image/vq.yaml")
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--root", help="folder with the Fashion-MNIST IDX files (default: Debian's package)")
    args = parser.parse_args()

    # the run goes where the config's logger says (runs/image-vq for vq.yaml), as the README's commands expect
    argv = ["fit", "--config", args.config, "--trainer.max_steps", str(args.max_steps)]
    argv += ["--trainer.val_check_interval", str(max(1, args.max_steps // 3))]
    if args.root:
        argv += ["--data.init_args.root", args.root]
    start = time.perf_counter()
    cli = lightning_cli(argv)
    train_minutes = (time.perf_counter() - start) / 60
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    model = cli.model.eval()
    test_loader = cli.datamodule.dataloader("test")
    usage = model.code_statistics(test_loader)["usage"]
    shape = (1, *model.encode(next(iter(test_loader))[0][:1]).shape[1:])
    folder = run_dir(cli.trainer)
    print(f"\ntrained {args.max_steps} steps in {train_minutes:.1f} min ({args.config})")
    print(f"test PSNR       {results['test/psnr']:.2f} dB")
    print(f"test SSIM       {results['test/ssim']:.4f}")
    print(f"codebook usage  {', '.join(f'{u:.1%}' for u in usage)} of the codes on the test set")
    tokens = math.prod(shape[1:-1])
    print(f"bits per image  {model.bits_per_image(shape)} ({tokens} tokens x {shape[-1]} codebook(s))")
    print(f"reconstructions {folder / 'reconstructions' / 'latest.png'}")
    print(f"codebook usage  {folder / 'codebook_usage' / 'latest.png'}")
    print(f"checkpoint      {cli.trainer.checkpoint_callback.last_model_path}")


if __name__ == "__main__":
    main()
