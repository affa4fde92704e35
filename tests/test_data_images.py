import numpy as np
import pytest
from PIL import Image

from bigray.config import ImageDataConfig
from bigray.data.cache import DataError
from bigray.data.images import DEBIAN_FASHION_MNIST, load_images

needs_debian_fmnist = pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist (make setup does this where apt is available)",
)


@needs_debian_fmnist
def test_fashion_mnist_full_offline():
    splits, info = load_images(ImageDataConfig())
    assert len(splits["train"]) == 60_000 and len(splits["test"]) == 10_000
    assert info.num_classes == 10 and info.channels == 1 and info.image_size == 28
    x, y = splits["train"][0]
    assert x.shape == (1, 28, 28) and x.dtype.is_floating_point is False and 0 <= y < 10
    labels = splits["test"].labels.numpy()
    assert np.bincount(labels).tolist() == [1000] * 10


def test_fashion_mnist_missing_says_what_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_images(ImageDataConfig(root=str(tmp_path / "empty"), download=False))


def _write_folder(root, classes, per_class=3, size=16):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_imagefolder_loads_and_skips_unreadable(tmp_path, caplog):
    _write_folder(tmp_path, ["cat", "dog"])
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    splits, info = load_images(ImageDataConfig(dataset="imagefolder", root=str(tmp_path)))
    assert info.class_names == ["cat", "dog"] and info.channels == 3
    assert len(splits["train"]) == 6 and len(splits["test"]) == 6
    assert "skipped 1 unreadable image" in caplog.text
    x, y = splits["train"][0]
    assert x.shape == (3, 16, 16)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "must contain train/ and test/"),
        (lambda root: _write_folder(root, ["only"]), "1 class folder"),
    ],
)
def test_imagefolder_bad_roots(tmp_path, setup, message):
    root = tmp_path / "images"
    setup(root)
    with pytest.raises(DataError, match=message):
        load_images(ImageDataConfig(dataset="imagefolder", root=str(root)))
