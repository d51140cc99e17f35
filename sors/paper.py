"""The paper's published numbers (``sors/paper_results.csv``: Tables 2-10 of Bian et al. 2021) and
how a cell of ours is matched to one of them.

A cell matches a published value when the data set family, the model (its row label, compared
without case, spaces or the ``x``/``×`` spelling), the attack and eps (in /255) agree; Table 6's rows
also need the operator count (``n_ops``, for rows labelled with their ``n_ops=`` grid point) and
Table 9's the ensemble size (``k`` = the attack's ``eot_samples``). Fashion-MNIST cells are compared
with the paper's MNIST numbers (the paper has no Fashion-MNIST experiment): :func:`paper_dataset`
says which data set a comparison is against.
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import dataclass
from pathlib import Path

DATA_FILE = Path(__file__).with_name("paper_results.csv")
# our data set -> the data set of the paper's numbers it is compared with
PAPER_DATASET = {"mnist": "mnist", "fashion_mnist": "mnist", "cifar10": "cifar10", "cifar100": "cifar100"}
DATASET_NAMES = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


@dataclass(frozen=True)
class PaperValue:
    """One published number: accuracy in % (metric ``accuracy``) or millions of parameters."""

    table: int
    dataset: str
    model: str
    attack: str
    eps_255: int | None
    value: float
    metric: str = "accuracy"
    n_ops: int | None = None
    k: int | None = None


def _int(text: str) -> int | None:
    return int(text) if text.strip() else None


@functools.lru_cache(maxsize=1)
def load() -> tuple[PaperValue, ...]:
    """Every published value of the data file, in file order (lowest table first)."""
    with open(DATA_FILE, newline="") as handle:
        lines = [line for line in handle if not line.startswith("#")]
    return tuple(
        PaperValue(
            table=int(r["table"]),
            dataset=r["dataset"],
            model=r["model"],
            attack=r["attack"],
            eps_255=_int(r["eps_255"]),
            value=float(r["value"]),
            metric=r["metric"],
            n_ops=_int(r["n_ops"]),
            k=_int(r["k"]),
        )
        for r in csv.DictReader(lines)
    )


_GRID_SUFFIX = re.compile(r"\s*\([^)]*\)\s*$")


def normalize_label(label: str) -> str:
    """A row label as compared with the paper's: lower case, ``×`` as ``x``, no spaces, without a
    trailing grid suffix such as `` (n_ops=2)``."""
    return _GRID_SUFFIX.sub("", label).replace("×", "x").replace(" ", "").lower()


def paper_dataset(dataset: str) -> str | None:
    """The data set of the paper's numbers for our ``dataset`` (None: the paper has none)."""
    return PAPER_DATASET.get(dataset)


def eps_255(eps: float) -> int | None:
    """eps (pixel scale) in whole 255ths, or None when it is not a whole number of them."""
    scaled = eps * 255
    return round(scaled) if abs(scaled - round(scaled)) < 1e-6 else None


def lookup(
    dataset: str, model_label: str, attack: str, eps: float, n_ops: int | None = None, k: int | None = None
) -> PaperValue | None:
    """The published accuracy of the cell (our data set, row label, attack, eps on the pixel scale),
    or None. ``n_ops``: the row's operators per layer; ``k``: its ``eot_samples`` (Table 9)."""
    family, model, eps_whole = paper_dataset(dataset), normalize_label(model_label), eps_255(eps)
    wants_n_ops = "n_ops=" in model_label
    for value in load():
        if (
            value.metric != "accuracy"
            or value.dataset != family
            or normalize_label(value.model) != model
            or value.attack != attack
            or value.eps_255 != eps_whole
        ):
            continue
        if (value.n_ops is not None) != wants_n_ops or (wants_n_ops and value.n_ops != n_ops):
            continue
        if value.k is not None and value.k != k:
            continue
        return value
    return None


def parameters(dataset: str, model_label: str) -> PaperValue | None:
    """Table 8's published parameter count (millions) for a row label, or None."""
    family, model = paper_dataset(dataset), normalize_label(model_label)
    return next(
        (
            v
            for v in load()
            if v.metric == "params_millions" and v.dataset == family and normalize_label(v.model) == model
        ),
        None,
    )
