"""Image data for tokenizers: a folder of images, torchvision data sets, or Fashion-MNIST files on disk.

Every source yields ``(image, label)`` with images as float tensors in [0, 1] of
shape (channels, image_size, image_size). Data is read in ``prepare_data`` /
``setup``, never in ``__init__``. The training order depends only on
``(seed, epoch)`` (:class:`EpochSeededSampler`), so a resumed run sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from tokenizers_q.checks import check_choice

SOURCES = ("fashion_mnist", "folder", "torchvision")
SPLITS = ("train", "val", "test")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def read_idx_images(path: str | Path) -> torch.Tensor:
    """Read an IDX image file (optionally gzipped), as used by (Fashion-)MNIST.

    Shapes:
        - output: (N, H, W), uint8
    """
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 16 or int.from_bytes(raw[:4], "big") != 0x0803:
        raise ValueError(f"{path} is not an IDX image file (magic 0x00000803)")
    n, h, w = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    if len(raw) != 16 + n * h * w:
        raise ValueError(f"{path} is truncated: header says {n}x{h}x{w} pixels, file holds {len(raw) - 16}")
    return torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).reshape(n, h, w)


def read_idx_labels(path: str | Path) -> torch.Tensor:
    """Read an IDX label file (optionally gzipped). Shapes: output (N,), int64."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != 0x0801:
        raise ValueError(f"{path} is not an IDX label file (magic 0x00000801)")
    n = int.from_bytes(raw[4:8], "big")
    if len(raw) != 8 + n:
        raise ValueError(f"{path} is truncated: header says {n} labels, file holds {len(raw) - 8}")
    return torch.frombuffer(bytearray(raw[8:]), dtype=torch.uint8).long()


def fit_images(images: torch.Tensor, channels: int, image_size: int) -> torch.Tensor:
    """uint8 or float images (N, H, W) / (N, C, H, W) -> float (N, channels, size, size) in [0, 1]."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] != channels:
        raise ValueError(f"cannot convert images with {x.shape[1]} channels to {channels}")
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0).contiguous()


class TensorImages(Dataset):
    """Images already in memory as a float tensor (N, C, H, W), with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


class EpochSeededSampler(Sampler[int]):
    """A random permutation that depends only on ``(seed, epoch)``; Lightning calls ``set_epoch``.

    ``start`` skips the first indices of the permutation (a resumed epoch); the
    length stays that of the whole epoch, as Lightning counts batches per epoch.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch, self.start = size, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=g)[self.start :].tolist())

    def __len__(self) -> int:
        return self.size


class ResumableLoader(DataLoader):
    """A shuffling DataLoader that Lightning can stop and resume in the middle of an epoch.

    Lightning saves ``state_dict()`` in every checkpoint and hands it back to
    ``load_state_dict()`` on resume; the resumed epoch then skips the batches the
    killed run had already trained on, in the same ``(seed, epoch)`` order. The
    loader draws its worker seeds from its own generator, so iterating it never
    moves the global torch RNG (which the training step uses).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, num_workers: int = 0):
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=EpochSeededSampler(len(dataset), seed),
            num_workers=num_workers,
            persistent_workers=num_workers > 0,  # workers decode while the model trains, kept across epochs
            generator=torch.Generator().manual_seed(seed),
        )
        self._yielded, self._skip = 0, 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self.sampler.start = skip * self.batch_size
        self._yielded = skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        # The loader has a length, so Lightning fetches no batch ahead: every batch handed out was trained on.
        return {"epoch": self.sampler.epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        finished = batches >= len(self)
        self.sampler.set_epoch(epoch + 1 if finished else epoch)
        self._skip = 0 if finished else batches


class SplitDataModule(L.LightningDataModule):
    """A data module whose ``setup`` fills ``self.splits`` (train / val / test datasets).

    Subclasses set ``batch_size``, ``num_workers`` and ``seed``; the training loader is a
    :class:`ResumableLoader`, the others keep their order.
    """

    item_name = "data"  # what a missing split lacks, for its error message
    splits: dict[str, Dataset]

    def dataloader(self, split: str, shuffle: bool = False) -> DataLoader:
        """A loader over ``split`` (train / val / test); used by the CLI's ``encode`` too."""
        check_choice("split", split, SPLITS)
        self.setup()
        if split not in self.splits:
            raise ValueError(f"no {split} {self.item_name}: pass {split}_{self.item_name}")
        data = self.splits[split]
        if shuffle:
            return ResumableLoader(data, self.batch_size, self.seed, self.num_workers)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")


class ImageDataModule(SplitDataModule):
    r"""Train / val / test images for tokenizers.

    Args:
        source: ``"fashion_mnist"`` (the IDX files of Debian's ``dataset-fashion-mnist``
            package, or any folder holding them), ``"folder"`` (torchvision
            ``ImageFolder``: ``root/<class>/<image>``), or ``"torchvision"``
            (``dataset`` from ``torchvision.datasets``, e.g. FashionMNIST, MNIST, CIFAR10).
        root: where the data lives. Default: Debian's Fashion-MNIST folder.
        dataset: torchvision data set name for ``source="torchvision"``.
        download: let torchvision download (needs a network). Default: False.
        image_size: images are resized to ``image_size`` x ``image_size``. Default: 32.
        channels: 1 (grey) or 3 (colour); images are converted. Default: 1.
        batch_size: Default: 64.
        num_workers: DataLoader workers. Default: 0.
        val_fraction: share of the training images held out for validation. Default: 0.05.
        test_fraction: share held out for test when the source has no test split (folders). Default: 0.1.
        test_root: a folder of held-out images (``root/<class>/<image>``, as ``root``) that is the whole test
            split, for ``source="folder"``: ``tokq test`` / ``tokq encode --split test`` then read images the
            training never saw, and nothing of ``root`` is held out for test. Default: None.
        max_train_images: use at most this many training images (quick runs). Default: all.
        seed: seed of the splits and of the training order. Default: 0.
    """

    def __init__(
        self,
        source: str = "fashion_mnist",
        root: str | None = None,
        dataset: str = "FashionMNIST",
        download: bool = False,
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        test_fraction: float = 0.1,
        max_train_images: int | None = None,
        seed: int = 0,
        test_root: str | None = None,
    ):
        super().__init__()
        check_choice("source", source, SOURCES)
        if test_root is not None and source != "folder":
            raise ValueError(f"test_root is a folder of held-out images for source='folder', got source={source!r}")
        check_choice("channels", channels, (1, 3))
        if not 0.0 <= val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"val_fraction and test_fraction must be in [0, 1), got {val_fraction}, {test_fraction}")
        self.save_hyperparameters()
        self.source, self.dataset_name, self.download = source, dataset, download
        self.root = root if root is not None else (DEBIAN_FASHION_MNIST if source == "fashion_mnist" else None)
        if self.root is None:
            raise ValueError(f"source={source!r} needs a root folder")
        self.image_size, self.channels = image_size, channels
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_train_images, self.seed, self.test_root = max_train_images, seed, test_root
        self.splits: dict[str, Dataset] = {}

    # -- reading each source -----------------------------------------------------------
    def _fashion_mnist(self) -> tuple[Dataset, Dataset]:
        root = Path(self.root)
        parts = {}
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images, labels = (
                next(iter(sorted(root.glob(f"{prefix}-{kind}-ubyte*"))), None)
                for kind in ("images-idx3", "labels-idx1")
            )
            if images is None or labels is None:
                raise FileNotFoundError(
                    f"no Fashion-MNIST {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz] in {root}; "
                    f"install them with `apt-get install dataset-fashion-mnist` or set root"
                )
            x = fit_images(read_idx_images(images), self.channels, self.image_size)
            parts[split] = TensorImages(x, read_idx_labels(labels))
        return parts["train"], parts["test"]

    def _transform(self):
        from torchvision import transforms

        steps = [transforms.Grayscale(1) if self.channels == 1 else transforms.Lambda(lambda im: im.convert("RGB"))]
        steps += [transforms.Resize(self.image_size), transforms.CenterCrop(self.image_size), transforms.ToTensor()]
        return transforms.Compose(steps)

    def _image_folder(self, root: Path) -> Dataset:
        from torchvision.datasets import ImageFolder

        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        try:
            return ImageFolder(str(root), transform=self._transform())
        except (FileNotFoundError, RuntimeError) as err:
            raise FileNotFoundError(f"no images found under {root} (expected {root}/<class>/<image>): {err}") from None

    def _folder(self) -> tuple[Dataset, Dataset]:
        full = self._image_folder(Path(self.root))
        if self.test_root is not None:
            return full, self._image_folder(Path(self.test_root))
        n_test = int(len(full) * self.test_fraction)
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed + 1)).tolist()
        return Subset(full, order[n_test:]), Subset(full, order[:n_test])

    def _torchvision(self) -> tuple[Dataset, Dataset]:
        import torchvision.datasets

        if not hasattr(torchvision.datasets, self.dataset_name):
            raise ValueError(f"torchvision.datasets has no data set {self.dataset_name!r}")
        cls = getattr(torchvision.datasets, self.dataset_name)
        try:
            train = cls(self.root, train=True, download=self.download, transform=self._transform())
            test = cls(self.root, train=False, download=self.download, transform=self._transform())
        except RuntimeError as err:
            raise FileNotFoundError(
                f"{self.dataset_name} not found under {self.root}: {err} (pass download=True with a network)"
            ) from None
        return train, test

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train, test = getattr(self, f"_{self.source}")()
        n_val = max(1, int(len(train) * self.val_fraction)) if self.val_fraction > 0 else 0
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
        train_idx = order[n_val:][: self.max_train_images] if self.max_train_images else order[n_val:]
        self.splits = {"train": Subset(train, train_idx), "val": Subset(train, order[:n_val]), "test": test}
        if len(self.splits["train"]) == 0:
            raise ValueError(f"no training images left from {self.root} after the validation split")
