"""Colour photographs that work offline: square crops of the photos bundled in scikit-image, split by photo.

Written as two ImageFolders (``root/train/<photo>/<i>.png`` and ``root/test/<photo>/<i>.png``) for
:class:`~tokenizers_q.trainers.ImageDataModule` (``source: folder``, ``test_root``): the held-out crops come from
photos the training never saw. ::

    python -m tokenizers_q.trainers.photo_crops runs/photos32 --size 32      # needs scikit-image
    tokq fit --config configs/image/photo32.yaml --data.init_args.root runs/photos32/train \\
        --data.init_args.test_root runs/photos32/test
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tokenizers_q.checks import check_int
from tokenizers_q.files import atomic_write

#: scikit-image's bundled colour photos (``skimage.data`` names) the training crops are cut from
TRAIN_PHOTOS = (
    "astronaut",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "motorcycle",
)
#: the photos of the held-out crops: a cat and a cup of coffee, neither seen in training
TEST_PHOTOS = ("chelsea", "coffee")


def photo(name: str) -> np.ndarray:
    """One bundled photo as uint8 (H, W, 3); ``"motorcycle"`` is the left view of the stereo pair."""
    try:
        from skimage import data
    except ImportError as err:
        raise ImportError("photo crops need scikit-image: pip install 'tokenizers_q[photos]'") from err
    names = (*TRAIN_PHOTOS, *TEST_PHOTOS)
    if name not in names:
        raise ValueError(f"unknown photo {name!r}; choose one of: {', '.join(names)}")
    image = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    return np.ascontiguousarray(image[..., :3])


def photo_crops(names: tuple[str, ...], count: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``count`` crops of ``size`` x ``size`` at seeded uniform positions, shared out evenly over ``names``.

    Shapes:
        - output: {photo name: (n, size, size, 3) uint8}
    """
    check_int("count", count)
    check_int("size", size)
    rng = np.random.default_rng(seed)
    crops = {}
    for i, name in enumerate(names):
        image = photo(name)
        h, w = image.shape[:2]
        if min(h, w) < size:
            raise ValueError(f"photo {name!r} is {h}x{w}, smaller than crops of {size}")
        n = count // len(names) + (i < count % len(names))
        ys, xs = rng.integers(0, h - size + 1, n), rng.integers(0, w - size + 1, n)
        crops[name] = np.stack([image[y : y + size, x : x + size] for y, x in zip(ys, xs)])
    return crops


def write_photo_crops(root: str | Path, size: int = 32, train: int = 3000, test: int = 500, seed: int = 0) -> Path:
    """Write ``train`` crops of :data:`TRAIN_PHOTOS` and ``test`` crops of :data:`TEST_PHOTOS` as PNG files under
    ``root/train`` and ``root/test``; returns ``root``. Each file is written atomically."""
    from PIL import Image

    root = Path(root)
    for split, names, count, split_seed in (
        ("train", TRAIN_PHOTOS, train, seed),
        ("test", TEST_PHOTOS, test, seed + 1),
    ):
        crops = photo_crops(names, count, size, split_seed)
        for name, images in tqdm(crops.items(), desc=f"{split} crops", unit="photo"):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for j, image in enumerate(images):
                atomic_write(folder / f"{j:05d}.png", lambda tmp, im=image: Image.fromarray(im).save(tmp, format="PNG"))
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="folder to write train/ and test/ into")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--train", type=int, default=3000, help="training crops")
    parser.add_argument("--test", type=int, default=500, help="held-out crops")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_photo_crops(args.root, args.size, args.train, args.test, args.seed))


if __name__ == "__main__":
    main()
