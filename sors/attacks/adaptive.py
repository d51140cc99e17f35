"""AutoAttack's ``rand`` version (APGD-CE + APGD-DLR with EOT over 20 draws; Croce & Hein 2020)
through torchattacks, and transfer attacks (examples crafted on a source model; Table 5)."""

from __future__ import annotations

import torch
from torch import nn

from sors.attacks.base import Attack, build, check_name, model_device, register
from sors.errors import ConfigError

TORCHATTACKS_HINT = "pip install --no-deps torchattacks==3.5.1"


def _torchattacks():
    """Import torchattacks lazily (it pins old `requests`, so it is not a runtime dependency)."""
    try:
        import torchattacks
    except ImportError as err:
        raise ImportError(f"attack 'autoattack_rand' needs torchattacks, which is not installed: "
                          f"{TORCHATTACKS_HINT}") from err
    return torchattacks


@register("autoattack_rand", label="AA-rand", order=70)
class AutoAttackRand(Attack):
    """APGD-CE then APGD-DLR (on the examples the first did not fool), each step's gradient averaged
    over ``eot_samples`` (20) sequential draws of the model, ``steps`` (100, as in AutoAttack)
    iterations, one restart. ``seed``: APGD's start seed (None: drawn from torch's global generator,
    so the evaluation's per-cell seed decides it). The global RNG state is restored afterwards."""

    name = "autoattack_rand"
    defaults = {"steps": 100, "eot_samples": 20, "seed": None}

    def perturb(self, x, y):
        ta = _torchattacks()
        seed = self.options["seed"]
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        attacks = [ta.APGD(self.model, norm="Linf", eps=self.eps, steps=self.options["steps"], n_restarts=1,
                           seed=seed, loss=loss, eot_iter=self.options["eot_samples"]) for loss in ("ce", "dlr")]
        for attack in attacks:
            attack.set_device(x.device)
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        # APGD re-seeds torch's global generator; keep that from leaking into the caller.
        with torch.random.fork_rng(devices=devices):
            return ta.MultiAttack(attacks)(x, y)


class TransferAttack(Attack):
    """Black-box transfer (Table 5): the ``base`` attack (fgsm, pgd, mim...) is run on ``source``;
    the target model (the one passed to ``build``) only scores the result. Options: ``source`` (an
    ``nn.Module``, required), ``base`` and the base attack's own options (``steps``, ...)."""

    name = "transfer"
    defaults = {"source": None, "base": "pgd", "source_name": None}

    def __init__(self, model: nn.Module, eps: float, **options):
        base_options = {k: options.pop(k) for k in list(options) if k not in self.defaults and k != "dataset"}
        super().__init__(model, eps, **options)
        source, base = self.options["source"], self.options["base"]
        if not isinstance(source, nn.Module):
            raise ConfigError("attack.source", f"attack {self.name!r} needs a source model to craft on",
                              "source_model=<nn.Module> (e.g. the undefended model, or a different architecture)")
        check_name(base)
        if base.startswith("transfer") or base == "none":
            raise ConfigError("attack.base", f"{base!r} cannot be transferred", "fgsm, pgd, mim, eot_pgd, cw...")
        self.inner = build(base, source, eps, dataset=self.dataset, **base_options)

    @property
    def spec(self):
        inner = dict(self.inner.spec)
        source = self.options["source_name"] or type(self.options["source"]).__name__
        return {**inner, "name": self.name, "base": self.options["base"], "source": source}

    def extra_models(self):
        return [self.options["source"]]

    def perturb(self, x, y):
        device = model_device(self.options["source"])
        return self.inner(x.to(device), y.to(device)).to(x.device)

    def project(self, adv, x):
        return self.inner.project(adv, x)


def _transfer_factory(name: str, base: str):
    def factory(model, eps, **options):
        options.setdefault("base", base)
        attack = TransferAttack(model, eps, **options)
        attack.name = name
        return attack
    factory.__doc__ = f"Transfer attack with base {base!r} (see :class:`TransferAttack`)."
    return factory


for _order, (_name, _base) in enumerate((("transfer", "pgd"), ("transfer_fgsm", "fgsm"), ("transfer_pgd", "pgd"),
                                         ("transfer_mim", "mim"))):
    register(_name, label=f"transfer-{_base.upper()}" if _name != "transfer" else "transfer", order=80 + _order,
             transfer=True)(_transfer_factory(_name, _base))
