"""SORS: Self-Orthogonal Randomization Super-network (Bian et al., Neurocomputing 2021).

A pure-PyTorch library: data, super-networks and baselines (``sors.models``), the SORS loss
(``sors.losses``), attacks (``sors.attacks``), input-transform defenses (``sors.defenses``) and
the evaluation protocol (``sors.evaluation``). It never imports Ray or MLflow.
"""

__version__ = "0.1.0"
