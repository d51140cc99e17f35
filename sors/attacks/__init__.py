"""Adversarial attacks in pixel space [0, 1]: ``sors.attacks.build(name, model, eps, **options)``.

Paper attacks: ``none`` (identity), ``fgsm``, ``pgd`` (7 steps of eps/4), ``mim`` (10 steps of
eps/10, decay 1), ``cw`` (C&W-L2, unbounded), ``ensemble_pgd`` (Table 9: mean gradient of k sampled
paths), ``eot_pgd`` (mean gradient over 20 draws in one batched forward), ``transfer`` /
``transfer_fgsm`` / ``transfer_pgd`` / ``transfer_mim`` (crafted on ``source=``, scored on the target).

Adaptive attacks for randomized models: ``eot_apgd`` (APGD on the expected softmax over per-example
path draws), ``autoattack_rand`` (APGD-CE + APGD-DLR with EOT, every example attacked), ``arc``
(Dbouk & Shanbhag 2022 over sampled paths), ``square_eot`` (gradient-free), and ``adaptive``: the
suite of all four, per-example worst case. Every attack is called as ``attack(images, labels) ->
adversarial images`` and exposes ``spec`` (its resolved settings); ``info(name)`` gives its registry
facts. ``EPS_GRIDS[dataset]`` holds the paper's L-inf radii.
"""

# importing each module registers its attacks
from sors.attacks.arc import ARC
from sors.attacks.base import EPS_GRIDS, Attack, available, build, check_name, dataset_of, eval_mode, info, project_linf
from sors.attacks.cw import CarliniWagnerL2
from sors.attacks.eot import EOTAPGD, AutoAttackRand
from sors.attacks.gradient import EOTPGD, FGSM, MIM, PGD, EnsemblePGD, NoAttack, eot_gradient
from sors.attacks.square import SquareEOT
from sors.attacks.suite import AdaptiveSuite
from sors.attacks.transfer import TransferAttack

__all__ = [
    "AdaptiveSuite",
    "ARC",
    "Attack",
    "AutoAttackRand",
    "available",
    "build",
    "CarliniWagnerL2",
    "check_name",
    "dataset_of",
    "EnsemblePGD",
    "EOTAPGD",
    "EOTPGD",
    "EPS_GRIDS",
    "eot_gradient",
    "eval_mode",
    "FGSM",
    "info",
    "MIM",
    "NoAttack",
    "PGD",
    "project_linf",
    "SquareEOT",
    "TransferAttack",
]
