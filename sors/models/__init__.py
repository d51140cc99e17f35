"""Model registry: ``sors.models.build(name, num_classes=10, in_channels=1, **options)``.

Names: ``lenet5``, ``sors_lenet5``, ``resnet18``, ``resnet34``, ``sors_resnet18``, ``vgg16``,
``ensemble`` (``members="lenet5*4"``), ``rse_lenet5``, ``rse_resnet18``. Super-networks
(:class:`SuperNet`) expose ``num_paths``, ``sample_path`` and ``forward(x, path=None)``.
"""

from sors.models import ensemble as _ensemble  # noqa: F401  (registers its builders)
from sors.models import lenet as _lenet  # noqa: F401
from sors.models import resnet as _resnet  # noqa: F401
from sors.models import vgg as _vgg  # noqa: F401
from sors.models.ensemble import RSE, Ensemble, PathAverage, mean_softmax_log
from sors.models.factory import ModelSize, build_from_config, is_randomized, member_names, model_size
from sors.models.registry import available, build, check_name, info
from sors.models.supernet import ChoiceLayer, FixedPath, SuperNet, freeze_path, is_super_network, per_example_sampling

__all__ = [
    "available",
    "build",
    "build_from_config",
    "check_name",
    "ChoiceLayer",
    "Ensemble",
    "FixedPath",
    "freeze_path",
    "info",
    "is_randomized",
    "is_super_network",
    "member_names",
    "mean_softmax_log",
    "model_size",
    "ModelSize",
    "PathAverage",
    "per_example_sampling",
    "RSE",
    "SuperNet",
]
