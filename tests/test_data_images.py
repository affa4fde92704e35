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


def test_imagefolder_refuses_oversized_and_disguised_images_naming_the_file(tmp_path):
    """A decompression bomb is refused from its header, before decoding (Serve's pixel limit by
    default); a TIFF named .png is refused; a BMP is not an image file here at all."""
    _write_folder(tmp_path, ["cat", "dog"])
    Image.new("RGB", (40, 30)).save(tmp_path / "train" / "dog" / "big.png")
    with pytest.raises(DataError, match=r"big.png is 40x30 = 1,200 pixels; data.max_image_pixels allows 1,000"):
        load_images(ImageDataConfig(dataset="imagefolder", root=str(tmp_path), max_image_pixels=1000))
    assert len(load_images(ImageDataConfig(dataset="imagefolder", root=str(tmp_path)))[0]["train"]) == 7
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "cat" / "old.bmp")  # ignored: not JPEG or PNG
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "cat" / "tiff.png", format="TIFF")
    with pytest.raises(DataError, match=r"tiff.png is a TIFF image named .png: training reads JPEG and PNG only"):
        load_images(ImageDataConfig(dataset="imagefolder", root=str(tmp_path)))


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


def test_truncated_jpeg_is_skipped_at_scan_and_training_runs(tmp_path, caplog):
    """A JPEG cut short after its header passes PIL's verify(); it must be counted as skipped, not crash training."""
    from bigray.config import ResNetJobConfig, from_dict
    from bigray.recipes.resnet import train_local

    _write_folder(tmp_path / "images", ["cat", "dog"], per_class=4)
    rng = np.random.default_rng(1)
    good = tmp_path / "good.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, format="JPEG", quality=95)
    data = good.read_bytes()
    (tmp_path / "images" / "train" / "dog" / "cut.jpg").write_bytes(data[: int(len(data) * 0.6)])
    with Image.open(tmp_path / "images" / "train" / "dog" / "cut.jpg") as im:
        im.verify()  # the header alone looks fine
    cfg = from_dict(
        ResNetJobConfig,
        {
            "data": {"dataset": "imagefolder", "root": str(tmp_path / "images")},
            "train": {"epochs": 1, "batch_size": 4, "lr": 0.01},
            "scaling": {"num_workers": 1},
        },
    )
    metrics, _ = train_local(cfg, str(tmp_path / "run"))
    assert "skipped 1 unreadable image" in caplog.text
    assert metrics["epoch"] == 1 and np.isfinite(metrics["train/loss"])
