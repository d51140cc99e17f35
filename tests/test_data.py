"""Data loading from the Debian Fashion-MNIST package and torchvision layouts."""

import gzip
import shutil

import pytest
import torch

from sors import data
from sors.errors import ConfigError, DataNotFoundError


def test_fashion_mnist_loads_as_pixels_in_unit_range(fmnist_test):
    images, labels = fmnist_test
    assert images.shape == (1000, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.max() > 0.9
    assert set(labels.unique().tolist()) == set(range(10))


def test_subsets_are_fixed_by_the_seed():
    a = data.load("fashion_mnist", "test", n=50, seed=1)
    b = data.load("fashion_mnist", "test", n=50, seed=1)
    c = data.load("fashion_mnist", "test", n=50, seed=2)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def test_torchvision_layout_with_uncompressed_files_is_found(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(f"{data.DEBIAN_FASHION_MNIST}/{stem}.gz") as src, open(raw / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    images, labels = data.load("fashion_mnist", "test", root=str(tmp_path), n=10)
    assert images.shape == (10, 1, 28, 28)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_a_missing_data_set_says_what_where_and_how(tmp_path, name):
    with pytest.raises(DataNotFoundError) as err:
        data.load(name, "train", root=str(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message and "expected" in message and "\n" not in message
    assert ("apt-get install" in message) if name == "fashion_mnist" else ("download=True" in message)


def test_a_truncated_idx_file_is_reported(tmp_path):
    src = f"{data.DEBIAN_FASHION_MNIST}/t10k-images-idx3-ubyte.gz"
    with gzip.open(src) as f:
        head = f.read(5000)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(head)
    shutil.copy(f"{data.DEBIAN_FASHION_MNIST}/t10k-labels-idx1-ubyte.gz", tmp_path)
    with pytest.raises(DataNotFoundError, match="truncated"):
        data.load("fashion_mnist", "test", root=str(tmp_path))


def test_unknown_data_set_names_the_option():
    with pytest.raises(ConfigError, match="data.name"):
        data.load("svhn", "train")


def test_cifar_augmentation_crops_and_flips_within_range():
    images = torch.rand(64, 3, 32, 32)
    out = data.augment_batch(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, images)
    unchanged = [torch.equal(o, i) for o, i in zip(out, images)]
    assert sum(unchanged) < 16  # most images moved (1/81 chance of no crop shift, then 1/2 no flip)
