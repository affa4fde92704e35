"""Image datasets behind one interface: Fashion-MNIST, CIFAR-10 and any ImageFolder tree.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package when installed (offline), else
from torchvision's downloader; CIFAR-10 from torchvision's downloader (each downloaded once per
node, under a lock); ImageFolder from a local tree or a storage URI (copied to each node once). Every dataset yields ``(uint8 CHW tensor, label)`` before transforms, plus a
:class:`DatasetInfo` that holds what training and serving need to preprocess identically.
"""

from __future__ import annotations

import gzip
import logging
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from bigray.artifacts.storage import FileLock, StorageError, absolute, cached_copy, is_uri
from bigray.config import ImageDataConfig
from bigray.data.cache import DataError

log = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass
class DatasetInfo:
    """What a model and its server need to know about the data (saved in every checkpoint)."""

    name: str
    class_names: list[str]
    channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    hflip: bool

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ArrayImages(Dataset):
    """In-memory uint8 images (N, H, W) or (N, H, W, C) with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None):
        if images.ndim == 3:
            images = images[:, :, :, None]
        self.images = torch.from_numpy(np.array(images.transpose(0, 3, 1, 2), copy=True, order="C"))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])


class FolderImages(Dataset):
    """An ImageFolder tree decoded on access; unreadable files were skipped (and counted) at scan time."""

    def __init__(self, samples: list[tuple[str, int]], channels: int, size: int, transform: Callable | None = None):
        self.samples = samples
        self.channels = channels
        self.size = size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            im = im.convert("L" if self.channels == 1 else "RGB").resize((self.size, self.size))
            arr = np.asarray(im, dtype=np.uint8)
        x = torch.from_numpy(arr.reshape(self.size, self.size, self.channels).transpose(2, 0, 1).copy())
        if self.transform is not None:
            x = self.transform(x)
        return x, label


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file as used by MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        _zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        if dtype_code != 0x08:
            raise DataError(f"{path}: unsupported IDX dtype {dtype_code:#x}")
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(dims)
    except (OSError, EOFError, struct.error, ValueError) as e:
        raise DataError(f"{path} is not a readable IDX file ({e}); reinstall the dataset") from None


def _local_root(root: str) -> Path:
    """data.root on this node: a folder in storage (s3://...) is copied here once per node."""
    try:
        return cached_copy(root, area="data")
    except StorageError as e:
        raise DataError(f"data.root: {e}") from None


def _fashion_dirs(root: str) -> list[Path]:
    if root:
        local = _local_root(root)
        return [local, local / "FashionMNIST" / "raw"]
    return [DEBIAN_FASHION_MNIST, Path("data/fashion_mnist/FashionMNIST/raw")]


def _load_fashion_mnist(cfg: ImageDataConfig) -> tuple[dict[str, ArrayImages], DatasetInfo]:
    for d in _fashion_dirs(cfg.root):
        if all((d / f).is_file() for pair in FASHION_FILES.values() for f in pair):
            break
    else:
        d = None
        if cfg.download and not is_uri(cfg.root):  # a folder in storage is what it holds
            d = _download_fashion_mnist(cfg)
        if d is None:
            where = cfg.root or f"{DEBIAN_FASHION_MNIST} or data/fashion_mnist"
            raise DataError(
                f"Fashion-MNIST not found in {where}. Install it offline with "
                "`apt-get install dataset-fashion-mnist`, or allow data.download=true with network access "
                "(torchvision downloads it), or set data.root to a folder holding the four idx .gz files."
            )
    splits = {}
    for split, (img_file, lbl_file) in FASHION_FILES.items():
        images, labels = read_idx(d / img_file), read_idx(d / lbl_file)
        if len(images) != len(labels):
            raise DataError(f"{d}: {img_file} has {len(images)} images but {lbl_file} has {len(labels)} labels")
        splits[split] = ArrayImages(images, labels)
    info = DatasetInfo("fashion_mnist", FASHION_MNIST_CLASSES, 1, 28, [0.2860], [0.3530], hflip=True)
    return splits, info


def _download_fashion_mnist(cfg: ImageDataConfig) -> Path | None:
    root = Path(cfg.root or "data/fashion_mnist")
    with FileLock(root.parent / f".{root.name}.download.lock"):  # workers on one node download once
        return _download_fashion_mnist_locked(root)


def _download_fashion_mnist_locked(root: Path) -> Path | None:
    import torchvision

    try:
        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
        torchvision.datasets.FashionMNIST(str(root), train=False, download=True)
    except Exception as e:  # network errors come in many types
        log.warning("torchvision could not download Fashion-MNIST: %s", e)
        return None
    return root / "FashionMNIST" / "raw"


def _load_cifar10(cfg: ImageDataConfig) -> tuple[dict[str, ArrayImages], DatasetInfo]:
    import torchvision

    root = str(_local_root(cfg.root)) if is_uri(cfg.root) else cfg.root or "data/cifar10"
    splits = {}
    for split in ("train", "test"):
        try:
            with FileLock(Path(root).parent / f".{Path(root).name}.download.lock"):  # workers on one node download once
                ds = torchvision.datasets.CIFAR10(
                    root, train=split == "train", download=cfg.download and not is_uri(cfg.root)
                )
        except Exception as e:
            raise DataError(
                f"CIFAR-10 is not in {root} and could not be downloaded ({e}); put cifar-10-batches-py "
                "there or allow data.download=true with network access"
            ) from None
        splits[split] = ArrayImages(np.asarray(ds.data), np.asarray(ds.targets))
    info = DatasetInfo(
        "cifar10", list(ds.classes), 3, 32, [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616], hflip=True
    )
    return splits, info


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
"""What an ImageFolder tree is read for: JPEG and PNG, as Serve accepts (other files are not images here)."""


def _scan_folder(root: Path, max_pixels: int) -> tuple[list[tuple[str, int]], list[str], int]:
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    samples, skipped = [], 0
    for label, cls in enumerate(classes):
        for p in sorted((root / cls).rglob("*")):
            if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                im = Image.open(p)
            except Exception:
                skipped += 1
                continue
            with im:
                (w, h), kind = im.size, im.format
                if kind not in ("JPEG", "PNG"):
                    raise DataError(f"{p} is a {kind} image named {p.suffix}: training reads JPEG and PNG only")
                if w * h > max_pixels:  # checked from the header, before anything is decoded
                    raise DataError(f"{p} is {w}x{h} = {w * h:,} pixels; data.max_image_pixels allows {max_pixels:,}")
                try:
                    im.load()  # decode every pixel: a file cut short after its header fails here, not in training
                except Exception:
                    skipped += 1
                    continue
            samples.append((str(p), label))
    return samples, classes, skipped


def _load_imagefolder(cfg: ImageDataConfig) -> tuple[dict[str, FolderImages], DatasetInfo]:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` (``val/`` also accepted for the test split)."""
    if not cfg.root:
        raise DataError("data.root must point to an ImageFolder tree when data.dataset is 'imagefolder'")
    root = _local_root(cfg.root)
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist")
    test_dir = root / "test" if (root / "test").is_dir() else root / "val"
    if not (root / "train").is_dir() or not test_dir.is_dir():
        raise DataError(f"data.root {root} must contain train/ and test/ (or val/) folders with one folder per class")
    train, classes, skipped_train = _scan_folder(root / "train", cfg.max_image_pixels)
    test, test_classes, skipped_test = _scan_folder(test_dir, cfg.max_image_pixels)
    if len(classes) < 2:
        raise DataError(f"{root / 'train'} has {len(classes)} class folder(s); classification needs at least 2")
    if test_classes != classes:
        raise DataError(f"class folders differ between {root / 'train'} ({classes}) and {test_dir} ({test_classes})")
    if not train or not test:
        raise DataError(f"{root} has no readable images in {'train' if not train else test_dir.name}/")
    if skipped_train or skipped_test:
        log.warning("skipped %d unreadable image files under %s", skipped_train + skipped_test, root)
    from PIL import Image

    with Image.open(train[0][0]) as im:
        channels = 1 if im.mode in ("L", "1", "I;16") else 3
        size = min(max(im.size), 224)
    info = DatasetInfo("imagefolder", classes, channels, size, [0.5] * channels, [0.25] * channels, hflip=True)
    return {"train": FolderImages(train, channels, size), "test": FolderImages(test, channels, size)}, info


_LOADERS = {"fashion_mnist": _load_fashion_mnist, "cifar10": _load_cifar10, "imagefolder": _load_imagefolder}


def with_absolute_root(cfg: ImageDataConfig) -> ImageDataConfig:
    """Pin the data root to an absolute path on the driver: Ray Train workers run in their own cwd."""
    import dataclasses

    if cfg.root:
        return dataclasses.replace(cfg, root=absolute(cfg.root))
    if cfg.dataset == "fashion_mnist" and (DEBIAN_FASHION_MNIST / FASHION_FILES["train"][0]).is_file():
        return dataclasses.replace(cfg, root=str(DEBIAN_FASHION_MNIST))
    return dataclasses.replace(cfg, root=str(Path("data", cfg.dataset).resolve()))


def load_images(cfg: ImageDataConfig) -> tuple[dict[str, Dataset], DatasetInfo]:
    """Both splits (``train``, ``test``) of the configured dataset, subset to the configured sizes."""
    splits, info = _LOADERS[cfg.dataset](cfg)
    for split, limit in (("train", cfg.max_train_samples), ("test", cfg.max_eval_samples)):
        if limit:
            splits[split] = _take(splits[split], limit)
    return splits, info


def _take(ds: Any, n: int) -> Any:
    if isinstance(ds, ArrayImages):
        ds.images, ds.labels = ds.images[:n], ds.labels[:n]
    else:
        ds.samples = ds.samples[:n]
    return ds


def image_summary(cfg: ImageDataConfig) -> dict[str, Any]:
    splits, info = load_images(cfg)
    return {
        "dataset": info.name,
        "classes": info.num_classes,
        "train": len(splits["train"]),
        "test": len(splits["test"]),
    }
