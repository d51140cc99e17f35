"""One-shot GPU benchmark of the SORS fast paths (run by ``bench/gpu_bench.sh``; <= 5 minutes on one
H100-class GPU).

Runs the ``sors bench`` cases on CUDA, most important first, and writes results after every case
so a cut-off run still leaves what it measured: SORS-ResNet-18 at CIFAR shapes (3x32x32), batch 128
(SORS step vs vanilla step ratio, vs the sequential reference, images/s, peak memory), EOT-PGD with
20 draws batched vs sequential, the fast-path ablation, PGD images/s, then SORS-LeNet-5, and
last whether torch.compile helps (it cannot compile the double backward of the SORS step).

Outputs (in ``$OUT`` when set, else only stdout): ``gpu_bench.json`` (machine + every row),
``gpu_bench.txt`` (the table). Exit 0 when every case ran, 1 when one failed or was skipped for
time, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from bench import cases, harness
from sors.kernels import retain_freed_memory


def plan(device: torch.device, quick: bool) -> list[tuple[str, harness.Settings]]:
    """(case, settings) in the order they run: the figures the issue asks for first."""
    reps = 2 if quick else 10

    def settings(**kw) -> harness.Settings:
        base = {"device": device, "repeats": reps, "warmup": 1 if quick else 2, "quick": quick}
        if quick:
            base.update(lenet_batch=8, resnet_batch=2, eot_batch=4, eot_samples=4, attack_steps=1)
        base.update(kw)
        return harness.Settings(**base)

    resnet, lenet = ("sors_resnet18",), ("sors_lenet5",)
    return [
        ("train_step", settings(models=resnet)),
        ("memory", settings(models=resnet)),
        ("eot", settings(attack_model="sors_resnet18", repeats=min(reps, 5), **({} if quick else {"eot_batch": 128}))),
        ("fastpaths", settings(ablation_model="sors_resnet18", repeats=min(reps, 5))),
        ("pgd", settings(attack_model="sors_resnet18", repeats=min(reps, 5))),
        ("train_step", settings(models=lenet)),
        ("eot", settings(attack_model="sors_lenet5", repeats=min(reps, 5))),
        ("pgd", settings(attack_model="sors_lenet5", repeats=min(reps, 5))),
        ("compile", settings(attack_model="sors_resnet18", repeats=min(reps, 5))),  # last: slow to build
    ]


# Cases that take long before they measure anything start only this early (seconds into the run).
START_BY = {"compile": 120.0}


def describe(device: torch.device) -> dict:
    info = harness.machine(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            tf32_conv=torch.backends.cudnn.allow_tf32,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    return info


def write(out_dir: Path | None, info: dict, rows: list[harness.Row], log: list[dict]) -> str:
    table = harness.format_table(info, rows)
    if log:
        table += "\n\n" + "\n".join(
            f"{e['case']}[{e['model']}]: {e['status']} {e.get('seconds', '')}s {e.get('error', '')}".rstrip()
            for e in log
        )
    if out_dir is not None:
        payload = {"machine": info, "results": [asdict(r) for r in rows], "cases": log}
        tmp = out_dir / "gpu_bench.json.tmp"
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(out_dir / "gpu_bench.json")
        (out_dir / "gpu_bench.txt").write_text(table + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script, not the GPU")
    parser.add_argument("--budget", type=float, default=250.0, help="seconds; later cases are skipped past it")
    args = parser.parse_args(argv)
    out = os.environ.get("OUT")
    out_dir = Path(out) if out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    retain_freed_memory()  # as sors.train and sors bench do
    start = time.monotonic()
    info, rows, log = describe(device), [], []
    print(f"gpu_bench: {info.get('gpu', info['cpu'])}, torch {info['torch']}", flush=True)
    for case, settings in plan(device, args.quick):
        model = (
            settings.attack_model
            if case in ("eot", "pgd", "compile")
            else (settings.ablation_model if case == "fastpaths" else ",".join(settings.models))
        )
        entry = {"case": case, "model": model}
        if time.monotonic() - start > min(args.budget, START_BY.get(case, args.budget)):
            entry["status"] = "skipped (time budget)"
            log.append(entry)
            continue
        began = time.monotonic()
        try:
            rows.extend(cases.CASES[case](settings))
            entry["status"] = "ok"
        except Exception as err:  # noqa: BLE001 -- one-shot run: keep going, report the failure
            entry["status"] = "failed"
            entry["error"] = (
                f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
            )
            traceback.print_exc()
        entry["seconds"] = round(time.monotonic() - began, 1)
        log.append(entry)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write(out_dir, info, rows, log)
        print(f"gpu_bench: {case}[{model}] {entry['status']} in {entry['seconds']} s", flush=True)
    info["total_seconds"] = round(time.monotonic() - start, 1)
    print(write(out_dir, info, rows, log))
    return 0 if all(e["status"] == "ok" for e in log) else 1


if __name__ == "__main__":
    sys.exit(main())
