"""``sors bench``: training and evaluation cost, measured side by side in one process.

Every figure compares two (or more) implementations of the same work on the same inputs, timed
interleaved (A, B, B, A, ...) after warm-up, and reports the median over ``--repeats`` (>= 5 by
default) together with the median of the per-repeat ratios (robust to a machine whose load drifts).

Cases (``--cases``, comma-separated; default all):

- ``train_step``: a SORS step (K=2 paths, lambda=10: loss, backward, SGD step) vs the vanilla step of
  the same super-network on one fixed path, same batch -> ratio; and the straightforward reference
  (one ``autograd.grad(create_graph=True)`` per path, sequentially, ``loss.backward()``) vs ours ->
  speedup. sors_lenet5 at 28x28 and sors_resnet18 at 32x32 (small batch on CPU).
- ``fastpaths``: the SORS step with each fast path switched off in turn (what each one buys).
- ``eot``: EOT-PGD with E=20 draws in one batched forward vs E sequential passes (and vs
  torchattacks' EOTPGD when installed) -> speedup.
- ``pgd``: images/s of our PGD vs torchattacks' PGD on the same deterministic model -> ratio.
- ``fanout``: evaluation cells as Ray tasks vs the same cells run one after another in this
  process -> overhead; and on a simulated 2-node cluster -> scaling.
- ``adaptive`` (opt-in): images/s of the adaptive suite vs the straightforward implementation of
  the same attacks (sequential draws, no early stop, every member on every example) on a trained
  SORS-LeNet-5 at eps 25/255 -> speedup (target >= 5).
- ``strength`` (opt-in): the suite's exact expected accuracy on held-out images of a trained
  SORS-LeNet-5, then stronger attacks from its points (3x the steps; targeted) -> how many points
  they find beyond the suite (near 0 when the suite is strong enough).
- ``sampled`` (opt-in): the suite with path enumeration switched off vs on, both scored exactly over
  every path of a trained SORS-LeNet-5 at 25/255 -> how many points weaker the sampled mode is, time ratio.
- ``memory``: peak RSS (CPU, in a fresh process) or peak allocated memory (GPU) of one training step.

Targets (CPU only; ``--target name=value`` overrides): train_step ratio for sors_lenet5 <= 4.5,
eot speedup >= 3, pgd ratio >= 1.0, fanout overhead <= 0.15. Exit 0 when all are met, 1 when one
is missed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import torch

from bench.cases import CASES, DEFAULT_CASES
from bench.harness import (
    CLOCK,
    CLOCKS,
    DEFAULT_TARGETS,
    TRAIN_MODELS,
    Row,
    Settings,
    check_targets,
    format_table,
    machine,
)
from pipeline.cliutil import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK
from sors import kernels


def parse_targets(items: list[str]) -> dict[str, tuple[str, float]]:
    targets = dict(DEFAULT_TARGETS)
    for item in items:
        name, _, value = item.partition("=")
        if name not in targets or not value:
            raise ValueError(f"--target {item!r}: expected one of {', '.join(targets)} =NUMBER")
        targets[name] = (targets[name][0], float(value))
    return targets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sors bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help=f"comma-separated subset of {','.join(CASES)} (default: all but compile)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (median; >= 5 for a report)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of every side first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall (default; the targets' clock) or process CPU time (use with --threads 1 on a shared machine)",
    )
    parser.add_argument("--eot-samples", type=int, default=20)
    parser.add_argument("--fanout-cells", type=int, default=5)
    parser.add_argument("--cell-seconds", type=float, default=5.0, help="length of one fan-out cell")
    parser.add_argument(
        "--models",
        default=",".join(TRAIN_MODELS),
        help="super-networks of the train_step and memory cases (comma-separated)",
    )
    parser.add_argument(
        "--attack-model",
        default="sors_lenet5",
        choices=list(TRAIN_MODELS),
        help="super-network of the eot and pgd cases",
    )
    parser.add_argument(
        "--ablation-model",
        default="sors_lenet5",
        choices=list(TRAIN_MODELS),
        help="super-network of the fastpaths case",
    )
    parser.add_argument("--lenet-batch", type=int, default=None)
    parser.add_argument("--resnet-batch", type=int, default=None)
    parser.add_argument("--eot-batch", type=int, default=None, help="images per attack batch (eot, pgd)")
    parser.add_argument("--attack-steps", type=int, default=3, help="PGD steps of the EOT attack")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test; figures not comparable)")
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a target threshold, e.g. train_step.sors_lenet5.ratio=5",
    )
    parser.add_argument("--no-targets", action="store_true", help="report only; exit 0 whatever the figures")
    return parser


def parse_models(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in TRAIN_MODELS]
    if unknown or not names:
        raise ValueError(f"--models: unknown {unknown or names}; choose from {', '.join(TRAIN_MODELS)}")
    return names


def settings_from(args: argparse.Namespace) -> Settings:
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    s = Settings(
        device=device,
        repeats=args.repeats,
        warmup=args.warmup,
        quick=args.quick,
        eot_samples=args.eot_samples,
        fanout_cells=args.fanout_cells,
        cell_seconds=args.cell_seconds,
        lenet_batch=args.lenet_batch,
        resnet_batch=args.resnet_batch,
        eot_batch=args.eot_batch,
        attack_steps=args.attack_steps,
        models=parse_models(args.models),
        attack_model=args.attack_model,
        ablation_model=args.ablation_model,
    )
    if args.quick:
        s.lenet_batch, s.resnet_batch, s.eot_batch = s.lenet_batch or 8, s.resnet_batch or 2, s.eot_batch or 8
        s.attack_steps = 1
        s.eot_samples = min(s.eot_samples, 4)
        s.fanout_cells, s.cell_seconds = min(s.fanout_cells, 2), min(s.cell_seconds, 0.5)
    return s


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sors bench``: 0 all targets met, 1 a target missed, 2 bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cases = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in cases if c not in CASES]
        if unknown or not cases:
            raise ValueError(f"--cases: unknown {unknown or cases}; choose from {', '.join(CASES)}")
        if args.repeats < 1 or args.warmup < 0:
            raise ValueError("--repeats must be >= 1 and --warmup >= 0")
        targets = parse_targets(args.target)
        s = settings_from(args)
    except ValueError as err:
        print(f"sors bench: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK["name"] = args.clock
    retained = kernels.retain_freed_memory()  # as training does (sors.train.train_one_epoch): both sides alike
    info = machine(s.device)
    info.update(clock=args.clock, retain_freed_memory=retained)
    rows: list[Row] = []
    for case in cases:
        rows.extend(CASES[case](s))
    if s.device.type == "cpu" and not args.no_targets:
        check_targets(rows, targets)
    info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    ok = all(r.ok is not False for r in rows)
    if args.json:
        print(
            json.dumps(
                {
                    "machine": info,
                    "settings": {**asdict(s), "device": str(s.device), "cases": cases},
                    "results": [asdict(r) for r in rows],
                    "ok": ok,
                }
            )
        )
    else:
        print(format_table(info, rows))
        missed = [r.name for r in rows if r.ok is False]
        print("\nall targets met" if ok else f"\ntargets missed: {', '.join(missed)}")
    return EXIT_OK if ok else EXIT_CHECK_FAILED


if __name__ == "__main__":
    sys.exit(main())
