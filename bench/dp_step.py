"""Data-parallel training steps over torch.distributed (NCCL on GPUs, gloo for a CPU dry run).

Runs ``sors.train.fit`` -- the same step Ray Train workers run: global-batch slices, hand all-reduced
gradients, global-batch BatchNorm -- on one process per GPU (at most ``--workers``), on synthetic
CIFAR-shaped images (no data set needed), and prints seconds per step and whether the ranks ended
bit-identical. ``python -m bench.dp_step [--device cpu --workers 2]``; JSON to ``$OUT/dp_step.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from sors import config as config_lib
from sors import train as train_lib


def _digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer: equal on two ranks iff they are bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _config(model: str, batch: int, world: int, steps: int) -> config_lib.RunConfig:
    return config_lib.resolve(
        config_lib.apply_overrides(
            config_lib.RunConfig(),
            {
                "data.name": "cifar10",
                "data.n_train": batch * world * steps,
                "data.n_test": 8,
                "data.augment": False,
                "model.name": model,
                "train.epochs": 1,
                "train.batch_size": batch,
                "train.num_workers": world,
                "train.optimizer": "sgd",
                "train.lr": 0.01,
                "train.momentum": 0.9,
            },
        )
    )


def _rank(rank: int, world: int, port: int, args: dict, folder: str) -> None:
    backend = "nccl" if args["device"] == "cuda" else "gloo"
    device = torch.device(f"cuda:{rank}") if args["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = _config(args["model"], args["batch"], world, args["steps"])
        gen = torch.Generator().manual_seed(0)
        n = cfg.data.n_train
        data = (
            (torch.rand(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)),
            (torch.rand(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)),
        )
        times = []

        def on_step(step: int, steps: int) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

        start = time.perf_counter()
        state = train_lib.fit(cfg, None, rank, world, device, on_step=on_step, data=data)
        steady = [b - a for a, b in zip(times[:-1], times[1:])] or [times[0] - start]
        result = {
            "rank": rank,
            "digest": _digest(state.model),
            "step_s": min(steady),
            "median_step_s": sorted(steady)[len(steady) // 2],
        }
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Run the steps; print one line per rank and a summary; 0 when the ranks agree."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--workers", type=int, default=2, help="at most this many ranks (one per GPU)")
    parser.add_argument("--model", default="sors_resnet18")
    parser.add_argument("--batch", type=int, default=128, help="per worker")
    parser.add_argument("--steps", type=int, default=6)
    args = vars(parser.parse_args(argv))
    available = torch.cuda.device_count() if args["device"] == "cuda" else args["workers"]
    world = max(1, min(args["workers"], available))
    if args["device"] == "cuda" and available == 0:
        print("dp_step: no CUDA device", file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_rank, args=(world, port, args, folder), nprocs=world, join=True, start_method="spawn")
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]
    summary = {
        "backend": "nccl" if args["device"] == "cuda" else "gloo",
        "world": world,
        **args,
        "identical_ranks": len({r["digest"] for r in ranks}) == 1,
        "step_s": max(r["step_s"] for r in ranks),
        "images_per_s": world * args["batch"] / max(r["step_s"] for r in ranks),
        "device_name": torch.cuda.get_device_name(0) if args["device"] == "cuda" else "cpu",
    }
    print(json.dumps(summary))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "dp_step.json").write_text(json.dumps({"summary": summary, "ranks": ranks}, indent=1))
    return 0 if summary["identical_ranks"] else 1


if __name__ == "__main__":
    sys.exit(main())
