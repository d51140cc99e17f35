"""Adversarial attacks in pixel space [0, 1]: ``sors.attacks.build(name, model, eps, **options)``.

Names: ``none`` (identity), ``fgsm``, ``pgd`` (7 steps of eps/4), ``mim`` (10 steps of eps/10,
decay 1), ``cw`` (C&W-L2, unbounded), ``ensemble_pgd`` (Table 9: mean gradient of k sampled paths),
``eot_pgd`` (mean gradient over 20 draws in one batched forward), ``autoattack_rand`` (APGD-CE +
APGD-DLR with EOT 20, via torchattacks), ``transfer`` / ``transfer_fgsm`` / ``transfer_pgd`` /
``transfer_mim`` (crafted on ``source=``, scored on the target). Every attack is called as
``attack(images, labels) -> adversarial images`` and exposes ``spec`` (its resolved settings).
``EPS_GRIDS[dataset]`` holds the paper's L-inf radii.
"""

from sors.attacks import adaptive as _adaptive  # noqa: F401  (registers autoattack_rand, transfer*)
from sors.attacks import cw as _cw  # noqa: F401
from sors.attacks import gradient as _gradient  # noqa: F401
from sors.attacks.adaptive import TORCHATTACKS_HINT, AutoAttackRand, TransferAttack
from sors.attacks.base import EPS_GRIDS, Attack, available, build, check_name, dataset_of, eval_mode, info, project_linf
from sors.attacks.cw import CarliniWagnerL2
from sors.attacks.gradient import EOTPGD, FGSM, MIM, PGD, EnsemblePGD, NoAttack, eot_gradient

__all__ = ["Attack", "AutoAttackRand", "available", "build", "CarliniWagnerL2", "check_name", "dataset_of",
           "EnsemblePGD", "EOTPGD", "EPS_GRIDS", "eot_gradient", "eval_mode", "info", "FGSM", "MIM", "NoAttack", "PGD",
           "project_linf", "TORCHATTACKS_HINT", "TransferAttack"]
