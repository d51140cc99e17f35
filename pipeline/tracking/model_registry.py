"""Trained models in MLflow: logged without pickle, registered, and the nightly's ``baseline`` alias.

Each trained model is logged once, on its trial's run, as a models-from-code pyfunc
(:mod:`pipeline.tracking.pyfunc_model`) with the weights-only checkpoint as its artifact, a signature
(float32 images N x C x H x W in [0, 1] -> float32 logits N x classes) and an input example; it is a
version of the registered model :func:`registered_name` (``<sweep>.<trial>``). Load it anywhere the
``sors`` package is installed::

    mlflow.pyfunc.load_model("models:/smoke.sors/1").predict(images)   # also with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from pipeline.tracking import runs as tracking
from sors import data as data_lib

BASELINE_ALIAS = "baseline"
CHECKPOINT_ARTIFACT = "checkpoint"  # the model's artifact key of the weights-only checkpoint
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # not imported here: MLflow runs it (set_model)
TAG_CHECKPOINT = "sors.checkpoint_sha256"  # on the model version and on the run that logged it
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def registered_name(sweep: str, trial: str) -> str:
    """The registered model of a sweep's trial: ``<sweep>.<trial>``, characters outside ``[A-Za-z0-9_.-]``
    replaced by ``-`` (MLflow's registry and ``models:/`` URIs choke on ``/``, ``:``, ``%`` and spaces)."""
    name = _UNSAFE.sub("-", f"{sweep}.{trial}").strip("-.")
    if not name:
        raise ValueError(f"no usable registered-model name in sweep {sweep!r}, trial {trial!r}")
    return name[:250]


def signature(cfg):
    """The model signature of a config's network: float32 (-1, C, H, W) images -> float32 (-1, classes) logits."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    spec = data_lib.spec(cfg.data.name)
    images = TensorSpec(np.dtype(np.float32), (-1, spec.in_channels, spec.image_size, spec.image_size))
    logits = TensorSpec(np.dtype(np.float32), (-1, spec.num_classes))
    return ModelSignature(inputs=Schema([images]), outputs=Schema([logits]))


def input_example(cfg) -> np.ndarray:
    """Two mid-grey images of the config's data set: float32 (2, C, H, W)."""
    spec = data_lib.spec(cfg.data.name)
    return np.full((2, spec.in_channels, spec.image_size, spec.image_size), 0.5, dtype=np.float32)


def log_model(
    tracking_uri: str, run_id: str, checkpoint: str | Path, cfg, name: str, checkpoint_sha256: str
) -> tuple[str, str]:
    """Log the checkpoint as the run's pyfunc model and register it as a version of ``name``.
    Returns ``(name, version)``."""
    import mlflow
    import mlflow.pyfunc
    import torch

    # log_model only speaks through the fluent API's process-wide URIs: set them for this call and
    # put back what the process had (a Ray worker or a test session goes on to other stores)
    saved = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_REGISTRY_URI")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
                signature=signature(cfg),
                input_example=input_example(cfg),
                registered_model_name=name,
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    "numpy",
                    f"mlflow=={mlflow.__version__}",
                ],
            )
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])  # None: the registry follows the tracking URI again
        if saved[1] is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)
    version = str(info.registered_model_version)
    tracking.client(tracking_uri).set_model_version_tag(name, version, TAG_CHECKPOINT, checkpoint_sha256)
    return name, version


def set_alias(tracking_uri: str, versions: dict[str, str], alias: str = BASELINE_ALIAS) -> None:
    """Point ``alias`` of each registered model in ``{name: version}`` at that version."""
    mlflow_client = tracking.client(tracking_uri)
    for name, version in versions.items():
        mlflow_client.set_registered_model_alias(name, alias, str(version))


def alias_versions(tracking_uri: str, names: list[str], alias: str = BASELINE_ALIAS) -> dict[str, str]:
    """``{name: version}`` that ``alias`` points at (models without the alias left out)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = tracking.client(tracking_uri)
    found = {}
    for name in names:
        try:
            found[name] = str(mlflow_client.get_model_version_by_alias(name, alias).version)
        except MlflowException as err:
            if (
                "RESOURCE_DOES_NOT_EXIST" not in str(getattr(err, "error_code", "")) + str(err)
                and "not found" not in str(err).lower()
            ):
                raise
    return found
