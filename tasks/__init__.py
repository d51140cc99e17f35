"""Units of work as plain functions of a typed config: train one model, evaluate one cell, measure
gradient orthogonality. No orchestration here; Ray appears only as ``ray.train.report``/checkpoint
calls inside the per-worker training loop (:mod:`tasks.training`)."""
