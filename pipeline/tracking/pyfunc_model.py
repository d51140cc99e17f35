"""The MLflow model of a trained SORS (or baseline) network, logged as *models from code*: MLflow stores
this file's source, not a pickle, so ``mlflow.pyfunc.load_model`` works with
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.

The weights travel as the weights-only checkpoint (artifact ``checkpoint``), read by
:func:`sors.train.load_checkpoint` (a weights-only torch load) in :meth:`SorsModel.load_context`.
:meth:`SorsModel.predict` takes float32 images with pixels in [0, 1], shape (N, C, H, W), and returns
logits (N, classes) as float32; a super-network samples a random path on every call, as it does when
deployed. Loading needs the ``sors`` package importable (``pip install`` this project).

MLflow executes this file when it logs and when it loads the model (``set_model`` below); nothing else
imports it.
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from pipeline.tracking.model_registry import CHECKPOINT_ARTIFACT
from sors import train as train_lib


class SorsModel(PythonModel):
    """A pyfunc around a checkpoint: ``predict(images) -> logits``, one random path per call."""

    def load_context(self, context) -> None:
        """Build the network from the checkpoint artifact (weights only: no pickle code runs)."""
        self.model, self.config, _ = train_lib.load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        self.model.eval()

    def predict(self, context, model_input, params=None) -> np.ndarray:
        """Logits (N, classes) float32 for images (N, C, H, W) float32 in [0, 1]."""
        if isinstance(model_input, dict):  # a named-tensor request (REST serving): its one tensor
            (model_input,) = model_input.values()
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(images).float().numpy()


mlflow.models.set_model(SorsModel())
