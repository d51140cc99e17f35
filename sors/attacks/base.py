"""The attack base class and registry.

Every attack works on pixels in [0, 1] (normalisation lives inside the models) and is called as
``attack(images, labels) -> adversarial images`` with the same shape. The base class does, once
for every attack: validation of eps and options, moving inputs to the model's device, putting the
model in eval mode (each module's own training flag is saved and restored afterwards, so a model
in training keeps training), and a final projection onto [0, 1] and the eps-ball.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from sors.errors import ConfigError
from sors.registry import Registry

ATTACKS: Registry[Callable[..., "Attack"]] = Registry("attack", "attack.name")
# @register("name", label=..., order=..., randomized_only=..., transfer=..., unbounded=...) on
# ``factory(model, eps, **options)``. Facts: ``label`` (table column), ``order`` (column rank, lower
# first), ``randomized_only`` (pointless on a deterministic model: it equals a plainer attack there),
# ``transfer`` (crafted on ``attack.source``), ``unbounded`` (no eps-ball: one cell, eps 0),
# ``iterative`` (many gradient steps: must not be weaker than FGSM), ``suite`` (a worst case over
# other attacks: must not be weaker than any of them), ``base`` (a transfer attack's base attack).
# The options an attack takes are its factory's ``defaults`` (:func:`option_names`).
register = ATTACKS.register
available = ATTACKS.available
check_name = ATTACKS.check_name


def info(name: str) -> dict[str, Any]:
    """The registered facts of attack ``name`` with defaults filled: label, order, randomized_only,
    transfer, unbounded, iterative, suite, base, and ``options`` (``{config option: default}``, see
    :func:`config_options`). :class:`ConfigError` for an unknown name."""
    facts = {
        "label": name,
        "order": 1000,
        "randomized_only": False,
        "transfer": False,
        "unbounded": False,
        "iterative": False,
        "suite": False,
        "base": None,
    }
    return {**facts, **ATTACKS.facts(name), "options": config_options(name)}


@dataclass(frozen=True)
class ConfigOption:
    """An attack option a run config addresses (``attack.<name>`` in ``--set`` and presets): its type,
    the values allowed, and what it does. Which attacks take it is read from each attack's ``defaults``."""

    name: str
    kind: type
    allowed: str
    help: str

    def check(self, value: Any) -> None:
        """:class:`ConfigError` on ``attack.<name>`` unless ``value`` (None: the attack's default) is allowed."""
        ok = value is None or (
            isinstance(value, self.kind) and (self.kind is not int or (not isinstance(value, bool) and value >= 1))
        )
        if not ok:
            raise ConfigError(f"attack.{self.name}", f"{value!r}", self.allowed)


# Options of the attacks that a config sets (the rest of an attack's ``defaults`` are its internals).
CONFIG_OPTIONS: dict[str, ConfigOption] = {
    o.name: o
    for o in (
        ConfigOption("steps", int, "an integer >= 1", "gradient (or query) steps"),
        ConfigOption("eot_samples", int, "an integer >= 1", "model draws averaged per step (EOT, ensemble size k)"),
        ConfigOption("random_start", bool, "true or false", "start from a uniform point of the eps-ball"),
        ConfigOption("source", str, "a checkpoint file or URI", "the model a transfer attack crafts on"),
    )
}


def option_names(name: str) -> set[str]:
    """Every option attack ``name`` takes: its own ``defaults`` and, for a transfer attack, its base
    attack's (the registry fact ``base``). :class:`ConfigError` for an unknown name."""
    names = set(getattr(ATTACKS[name], "defaults", {}))
    base = ATTACKS.fact(name, "base")
    return names | option_names(base) if base else names


def config_options(name: str) -> dict[str, Any]:
    """``{option: default}`` of the :data:`CONFIG_OPTIONS` attack ``name`` takes (a transfer attack's
    defaults are its base attack's)."""
    base = ATTACKS.fact(name, "base")
    defaults = (
        {**getattr(ATTACKS[base], "defaults", {}), **getattr(ATTACKS[name], "defaults", {})}
        if base
        else (getattr(ATTACKS[name], "defaults", {}))
    )
    return {o: defaults.get(o) for o in CONFIG_OPTIONS if o in option_names(name)}


def takers(option: str, names: list[str] | None = None) -> list[str]:
    """The attacks among ``names`` (default: every registered one) that take config option ``option``."""
    return [n for n in (available() if names is None else names) if option in option_names(n)]


# Paper settings (Sec. 4): L-inf radii on the pixel scale. MNIST-like: 25..100/255, CIFAR: 1..8/255.
EPS_GRIDS: dict[str, tuple[float, ...]] = {
    "mnist": tuple(e / 255 for e in (25, 50, 75, 100)),
    "fashion_mnist": tuple(e / 255 for e in (25, 50, 75, 100)),
    "cifar10": tuple(e / 255 for e in (1, 2, 4, 8)),
    "cifar100": tuple(e / 255 for e in (1, 2, 4, 8)),
}


def build(name: str, model: nn.Module, eps: float, **options) -> "Attack":
    """Build a registered attack on ``model`` with L-inf radius ``eps`` (pixel scale, in [0, 1]).

    ``options`` are the attack's own settings (``steps``, ``step_size``, ``eot_samples``...); ``None``
    values mean "the attack's default". Unknown names and options raise :class:`ConfigError`.
    """
    factory = ATTACKS[name]
    if not isinstance(eps, (int, float)) or not 0 <= float(eps) <= 1 or math.isnan(float(eps)):
        raise ConfigError("attack.eps", f"ε = {eps} is outside the pixel scale", "0 <= eps <= 1 (e.g. 25/255)")
    return factory(model, float(eps), **{k: v for k, v in options.items() if v is not None})


def dataset_of(images: torch.Tensor, num_classes: int = 10) -> str:
    """Best guess of the data set family from a batch (for paper defaults that differ by data set):
    one channel -> ``mnist``; three channels -> ``cifar100`` with 100 classes, else ``cifar10``."""
    if images.shape[1] == 1:
        return "mnist"
    return "cifar100" if num_classes == 100 else "cifar10"


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a module without tensors)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


class eval_mode:
    """Context manager: every module of ``model`` in eval mode; each module's own flag restored on exit."""

    def __init__(self, *models: nn.Module | None):
        self.models = [m for m in models if m is not None]
        self.saved: list[tuple[nn.Module, bool]] = []

    def __enter__(self):
        self.saved = [(m, m.training) for model in self.models for m in model.modules()]
        for model in self.models:
            model.eval()
        return self

    def __exit__(self, *exc):
        for module, flag in self.saved:
            module.training = flag
        return False


def linf_box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The eps-ball around ``x`` (pixels in [0, 1]) intersected with [0, 1], as per-pixel (low, high)
    bounds. Iterative attacks compute it once and project each step with ``torch.clamp(adv, low, high)``."""
    return (x - eps).clamp_(0.0, 1.0), (x + eps).clamp_(0.0, 1.0)


def project_linf(adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip ``adv`` into the L-inf ball of radius ``eps`` around ``x`` and into [0, 1]."""
    return torch.clamp(adv, *linf_box(x, eps))


def ce_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """d loss / dx per example, (B, C, H, W), from one forward of ``model`` (one path draw).

    The loss is *summed* over the batch, so each example's gradient does not depend on the batch size.
    """
    inp = x.detach().requires_grad_(True)
    out = model(inp)
    value = LOSSES[loss](out, y).sum()
    return torch.autograd.grad(value, inp)[0]


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y per example: positive once misclassified (C&W's f without kappa)."""
    real = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - real


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": lambda out, y: F.cross_entropy(out, y, reduction="none"),
    "margin": margin_loss,
}


class Attack:
    """Base class. Subclasses set ``name``, ``norm``, ``defaults`` (every option with its default)
    and implement :meth:`perturb` on tensors already on the model's device, with the model in eval mode.

    ``spec`` is a JSON-able dict of the fully resolved settings: name, norm, eps, steps, eot_samples
    and every option.
    """

    name = "attack"
    norm = "linf"
    defaults: dict[str, Any] = {}

    def __init__(self, model: nn.Module, eps: float, **options):
        unknown = sorted(set(options) - set(self.defaults) - {"dataset"})
        if unknown:
            raise ConfigError(
                f"attack.{unknown[0]}",
                f"not an option of attack {self.name!r}",
                ", ".join(sorted(self.defaults)) or "no options",
            )
        self.model = model
        self.eps = float(eps)
        self.dataset: str | None = options.pop("dataset", None)
        self.options = {**self.defaults, **options}
        self.last_stats: dict[str, float] = {}
        self.validate()

    def validate(self) -> None:
        """Check option values; raise :class:`ConfigError` naming ``attack.<option>``."""
        for key in ("steps", "eot_samples"):
            value = self.options.get(key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"attack.{key}", f"{value!r}", "an integer >= 1")

    @property
    def spec(self) -> dict[str, Any]:
        """Resolved settings, JSON-able."""
        spec = {
            "name": self.name,
            "norm": self.norm,
            "eps": self.eps,
            "steps": self.options.get("steps"),
            "eot_samples": self.options.get("eot_samples"),
        }
        spec.update({k: _jsonable(v) for k, v in self.options.items() if k not in spec})
        return spec

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial versions of ``images`` (B, C, H, W) in [0, 1] for true ``labels`` (B,).

        Returned on the device and dtype of ``images``; the model's mode flags are restored.
        """
        device = model_device(self.model)
        x = images.detach().to(device=device, dtype=torch.float32)
        y = labels.detach().to(device=device, dtype=torch.long)
        with eval_mode(self.model, *self.extra_models()), torch.enable_grad():
            adv = self.perturb(x, y)
        adv = self.project(adv.detach(), x)
        return adv.to(device=images.device, dtype=images.dtype)

    def extra_models(self) -> list[nn.Module]:
        """Other models the attack runs (a transfer source); put in eval mode too."""
        return []

    def project(self, adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Final safety projection: [0, 1] and, for L-inf attacks, the eps-ball."""
        return project_linf(adv, x, self.eps) if self.norm == "linf" else adv.clamp(0.0, 1.0)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.spec.items() if k != "name")
        return f"{type(self).__name__}({options})"


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)
