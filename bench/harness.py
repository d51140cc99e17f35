"""The timing harness of ``sors bench``: interleaved repeats and paired ratios, the machine a figure
comes from, memory probes (peak RSS on CPU, peak allocated CUDA memory), targets and the table."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

# (model, input shape, CPU batch, GPU batch)
TRAIN_MODELS = {
    "sors_lenet5": ((1, 28, 28), 128, 128),
    "sors_resnet18": ((3, 32, 32), 8, 128),
}
# name -> (comparison, threshold); checked on CPU only (the targets are for a 2-core CPU)
DEFAULT_TARGETS: dict[str, tuple[str, float]] = {
    "train_step.sors_lenet5.ratio": ("<=", 4.5),
    "eot.speedup_vs_sequential": (">=", 3.0),
    "pgd.ratio_vs_torchattacks": (">=", 1.0),
    "fanout.overhead": ("<=", 0.15),
    "adaptive.speedup_vs_reference": (">=", 5.0),
}


@dataclass
class Row:
    """One reported figure. ``name`` is ``case.what`` (targets address it); ``detail`` holds the
    raw medians it was computed from."""

    name: str
    value: float | None
    unit: str
    detail: dict[str, Any] = field(default_factory=dict)
    target: str | None = None
    ok: bool | None = None


@dataclass
class Settings:
    """What the cases run with (``--quick`` shrinks sizes for smoke tests)."""

    device: torch.device
    repeats: int = 5
    warmup: int = 2
    quick: bool = False
    eot_samples: int = 20
    fanout_cells: int = 5
    cell_seconds: float = 5.0
    lenet_batch: int | None = None
    resnet_batch: int | None = None
    eot_batch: int | None = None
    attack_steps: int = 3
    models: tuple[str, ...] = tuple(TRAIN_MODELS)
    attack_model: str = "sors_lenet5"
    ablation_model: str = "sors_lenet5"


# ---------------------------------------------------------------------------------------------
# measurement


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}
CLOCK = {"name": "wall"}  # set by --clock


def measure(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int = 5, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each callable, ``repeats`` times, interleaved: the order alternates every repeat
    (A B C, C B A, ...) so a slow drift of machine load hits every side alike. Wall time unless
    ``--clock process`` (CPU seconds of this process: with --threads 1, blind to other processes)."""
    clock = CLOCKS[CLOCK["name"]]
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            synchronize(device)
            start = clock()
            fns[name]()
            synchronize(device)
            times[name].append(clock() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over repeats of time[num] / time[den] (pairs taken in the same repeat)."""
    return median([a / b for a, b in zip(times[num], times[den])])


def ms(values: list[float]) -> float:
    return round(median(values) * 1e3, 3)


# ---------------------------------------------------------------------------------------------
# machine


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    """The machine the figures come from: CPU, threads, torch, device, load average."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------------------------------------
# memory probes


def _status_bytes(field_name: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes; 0 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def current_rss_bytes() -> int:
    """Resident set size now (Linux), 0 where unavailable."""
    return _status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Restart the peak-RSS counter (VmHWM) from the current RSS (Linux >= 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS of this process's address space since the last reset (VmHWM; ru_maxrss elsewhere)."""
    return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gpu_step_memory(fn: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Peak allocated CUDA memory of one call, MiB, above what was allocated before it."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    mib = 1024 * 1024
    return {
        "allocated_before_mib": round(before / mib, 1),
        "peak_allocated_mib": round(peak / mib, 1),
        "step_peak_mib": round((peak - before) / mib, 1),
    }


# ---------------------------------------------------------------------------------------------
# targets and output


def check_targets(rows: list[Row], targets: dict[str, tuple[str, float]]) -> None:
    """Mark each row that has a target as met or missed (in place)."""
    for row in rows:
        if row.name in targets and row.value is not None:
            op, bound = targets[row.name]
            row.target = f"{op} {bound:g}"
            row.ok = row.value <= bound if op == "<=" else row.value >= bound


def format_table(info: dict[str, Any], rows: list[Row]) -> str:
    """The human table: machine header, one line per figure."""
    head = (
        f"sors bench  {info['date']}  device={info['device']}"
        + (f" ({info['gpu']})" if "gpu" in info else "")
        + f"\ncpu={info['cpu']}  cores={info['cores']}  torch threads={info['torch_threads']}  "
        f"torch={info['torch']}  load={info['load_average']}"
        + (f" -> {info['load_average_end']}" if "load_average_end" in info else "")
        + f"  clock={info.get('clock', 'wall')}"
        + ("  freed memory retained" if info.get("retain_freed_memory") else "")
    )
    lines = [head, ""]
    width = max([len(r.name) for r in rows] + [10])
    lines.append(f"{'figure':<{width}}  {'value':>10}  {'unit':<30} {'target':<8} {'ok':<4} detail")
    for r in rows:
        value = "n/a" if r.value is None else f"{r.value:.4g}"
        ok = "" if r.ok is None else ("yes" if r.ok else "NO")
        detail = ", ".join(f"{k}={v}" for k, v in r.detail.items())
        lines.append(f"{r.name:<{width}}  {value:>10}  {r.unit:<30} {r.target or '':<8} {ok:<4} {detail}")
    return "\n".join(lines)
