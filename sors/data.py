"""Data sets as in-memory tensors: images are float pixels in [0, 1], shape (N, C, H, W).

Normalisation is *not* applied here: it is a layer inside each model, so attacks work in pixel
space. MNIST and Fashion-MNIST are read from IDX files (gzipped or not) in the layouts that
torchvision and the Debian package ``dataset-fashion-mnist`` use; CIFAR-10/100 load through
``torchvision.datasets`` with ``download=False``. Nothing is ever downloaded here.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sors.errors import ConfigError, DataNotFoundError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DEFAULT_ROOT_ENV = "SORS_DATA_ROOT"


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a data set."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    files: str = "idx"  # "idx": MNIST-format IDX files; "cifar": torchvision's CIFAR pickles
    augment: bool = False  # crop + flip by default (data.augment unset): natural images only


SPECS = {
    "mnist": DatasetSpec("mnist", 10, 1, 28, (0.1307,), (0.3081,)),
    "fashion_mnist": DatasetSpec("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,)),
    "cifar10": DatasetSpec("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar", True),
    "cifar100": DatasetSpec("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar", True),
}

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TORCHVISION_DIR = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of a data set name; unknown names raise :class:`ConfigError`."""
    if name not in SPECS:
        raise ConfigError("data.name", f"unknown data set {name!r}", ", ".join(SPECS))
    return SPECS[name]


def default_root(name: str) -> str:
    """Where a data set is looked for when no root is given."""
    if name == "fashion_mnist" and not os.environ.get(DEFAULT_ROOT_ENV):
        return DEBIAN_FASHION_MNIST
    return os.environ.get(DEFAULT_ROOT_ENV, "./data")


def _read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (EOFError, OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DataNotFoundError(
            f"{path}: unreadable ({type(err).__name__}: truncated or corrupt? copy the file again)"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DataNotFoundError(f"{path}: not an unsigned-byte IDX file (corrupt or truncated?)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataNotFoundError(f"{path}: expected {int(np.prod(dims))} values, found {body.size} (truncated?)")
    return body.reshape(dims)


def _find_idx(root: Path, name: str, stem: str) -> Path | None:
    folders = [root, root / "raw", root / _TORCHVISION_DIR[name] / "raw", root / _TORCHVISION_DIR[name]]
    for folder in folders:
        for candidate in (folder / stem, folder / (stem + ".gz")):
            if candidate.is_file():
                return candidate
    return None


def _idx_size_problem(path: Path) -> str | None:
    """Why an IDX file (optionally gzipped) is shorter or longer than its header says, or None; reads
    the header and, for ``.gz``, the trailer's uncompressed size -- not the whole file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(4)
            if len(header) < 4 or header[:3] != b"\x00\x00\x08":
                return "not an unsigned-byte IDX file"
            dims = handle.read(4 * header[3])
        expected = (
            4 + len(dims) + int(np.prod([int.from_bytes(dims[i : i + 4], "big") for i in range(0, len(dims), 4)]))
        )
        if path.suffix != ".gz":
            actual = path.stat().st_size
        else:  # gzip's last 4 bytes: the uncompressed size mod 2**32 (a cut file ends in compressed data)
            with open(path, "rb") as raw:
                raw.seek(-4, os.SEEK_END)
                actual, expected = int.from_bytes(raw.read(4), "little"), expected % 2**32
    except (EOFError, OSError, zlib.error) as err:
        return f"unreadable ({type(err).__name__})"
    return None if actual == expected else f"{actual} bytes where its header says {expected}"


def check_intact(name: str, root: str | None = None) -> None:
    """Every file of both splits is present and whole (cheap: headers and sizes, not the pixels), so a
    truncated copy fails before training rather than when the split is first read.
    Raises :class:`DataNotFoundError` naming the file."""
    folder = Path(root if root else default_root(name)).expanduser()
    if spec(name).files == "cifar":
        return  # torchvision checks its pickles' MD5 sums itself (``_check_integrity``)
    for stems in _IDX_FILES.values():
        for stem in stems:
            path = _find_idx(folder, name, stem)
            if path is None:
                raise DataNotFoundError(_missing_message(name, folder, [s + "[.gz]" for s in stems]))
            problem = _idx_size_problem(path)
            if problem:
                raise DataNotFoundError(f"{path}: {problem} (truncated or corrupt? copy the file again)")


def _missing_message(name: str, root: Path, files: list[str]) -> str:
    how = {
        "fashion_mnist": "install the Debian package (apt-get install dataset-fashion-mnist, files land in "
        f"{DEBIAN_FASHION_MNIST}) or pass --data-root to a folder holding them",
        "mnist": "on a machine with internet run `python -c \"import torchvision; torchvision.datasets.MNIST('ROOT', "
        'download=True)"` and copy ROOT here, then pass --data-root ROOT',
        "cifar10": "on a machine with internet run `python -c \"import torchvision; torchvision.datasets.CIFAR10('ROOT', "
        'download=True)"` and copy ROOT here, then pass --data-root ROOT',
        "cifar100": "on a machine with internet run `python -c \"import torchvision; torchvision.datasets.CIFAR100('ROOT', "
        'download=True)"` and copy ROOT here, then pass --data-root ROOT',
    }[name]
    return f"data set {name} not found in {root} (expected {', '.join(files)}); {how}"


def _load_idx_split(name: str, root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    stems = _IDX_FILES[split]
    paths = [_find_idx(root, name, stem) for stem in stems]
    if None in paths:
        raise DataNotFoundError(_missing_message(name, root, [s + "[.gz]" for s in stems]))
    images = torch.from_numpy(_read_idx(paths[0]).copy()).float().div_(255.0).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(paths[1]).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise DataNotFoundError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} labels")
    return images, labels


def _load_cifar_split(name: str, root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision  # heavy import kept local: MNIST-family users never pay it

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        ds = cls(str(root), train=(split == "train"), download=False)
    except RuntimeError:
        folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        raise DataNotFoundError(_missing_message(name, root, [f"{folder}/ (the python version)"])) from None
    images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).float().div_(255.0)
    return images.contiguous(), torch.tensor(ds.targets, dtype=torch.long)


def subset_index(total: int, n: int | None, seed: int) -> torch.Tensor:
    """Indices into a split of ``total`` examples of the fixed random subset of size ``n`` (seeded),
    or ``arange(total)`` when n is None or >= total: (min(n, total),) long."""
    if n is None or n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def load(name: str, split: str, root: str | None = None, n: int | None = None, seed: int = 0):
    """Load a split of a data set.

    Args:
        name: ``mnist``, ``fashion_mnist``, ``cifar10`` or ``cifar100``.
        split: ``train`` or ``test``.
        root: folder holding the data (see :func:`default_root` when None).
        n: keep a fixed random subset of this many examples (seeded by ``seed``).

    Returns:
        ``(images, labels)``: float tensor (N, C, H, W) with pixels in [0, 1], long tensor (N,).

    Raises:
        DataNotFoundError: the files are missing; the message names them, the folder and how to get them.
    """
    images, labels, _ = load_indexed(name, split, root, n, seed)
    return images, labels


def load_indexed(name: str, split: str, root: str | None = None, n: int | None = None, seed: int = 0):
    """:func:`load`, plus each kept example's index in the full split: ``(images, labels, index)``
    with index (N,) long. The same image has the same index in every cell and every run, so
    per-example outcomes of different attacks or nights can be paired."""
    files = spec(name).files
    if split not in _IDX_FILES:
        raise ConfigError("split", f"unknown split {split!r}", "train, test")
    folder = Path(root if root else default_root(name)).expanduser()
    loader = _load_cifar_split if files == "cifar" else _load_idx_split
    images, labels = loader(name, folder, split)
    index = subset_index(len(labels), n, seed)
    return images[index], labels[index], index


def augment_batch(images: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4) -> torch.Tensor:
    """CIFAR training augmentation on a batch: random crop with zero padding and horizontal flip.

    images: (B, C, H, W) in [0, 1]; returns a new tensor of the same shape.
    """
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    rows = (dy.view(-1, 1) + torch.arange(height)).to(images.device)
    cols = (dx.view(-1, 1) + torch.arange(width)).to(images.device)
    index = torch.arange(batch, device=images.device).view(-1, 1, 1)
    cropped = padded.permute(0, 2, 3, 1)[index, rows.unsqueeze(2), cols.unsqueeze(1)].permute(0, 3, 1, 2)
    flip = (torch.rand(batch, generator=generator) < 0.5).to(images.device)
    return torch.where(flip.view(-1, 1, 1, 1), cropped.flip(3), cropped).contiguous()


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
):
    """Yield ``(images, labels)`` mini-batches of at most ``batch_size`` examples."""
    order = torch.randperm(len(labels), generator=generator) if shuffle else torch.arange(len(labels))
    for start in range(0, len(labels), batch_size):
        index = order[start : start + batch_size]
        yield images[index], labels[index]
