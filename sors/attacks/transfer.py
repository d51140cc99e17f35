"""Transfer attacks: examples crafted on a source model, scored on the target (Table 5)."""

from __future__ import annotations

from torch import nn

from sors.attacks.base import Attack, build, check_name, info, model_device, register
from sors.errors import ConfigError


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
            raise ConfigError(
                "attack.source",
                f"attack {self.name!r} needs a source model to craft on",
                "source_model=<nn.Module> (e.g. the undefended model, or a different architecture)",
            )
        check_name(base)
        if info(base)["transfer"] or base == "none":
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
    factory.defaults = {**TransferAttack.defaults, "base": base}  # its options; the base attack's join them
    return factory


for _order, (_name, _base) in enumerate(
    (("transfer", "pgd"), ("transfer_fgsm", "fgsm"), ("transfer_pgd", "pgd"), ("transfer_mim", "mim"))
):
    register(
        _name,
        label=f"transfer-{_base.upper()}" if _name != "transfer" else "transfer",
        order=80 + _order,
        transfer=True,
        base=_base,
    )(_transfer_factory(_name, _base))
