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
- ``memory``: peak RSS (CPU, in a fresh process) or peak allocated memory (GPU) of one training step.

Targets (CPU only; ``--target name=value`` overrides): train_step ratio for sors_lenet5 <= 4.5,
eot speedup >= 3, pgd ratio >= 1.0, fanout overhead <= 0.15. Exit 0 when all are met, 1 when one
is missed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sors import kernels, losses, models

REPO_ROOT = Path(__file__).resolve().parent.parent

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


def measure(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int = 5,
            warmup: int = 1) -> dict[str, list[float]]:
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
        for name in (names if r % 2 == 0 else names[::-1]):
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
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------------------------------------
# training step


def distinct_paths(model: models.SuperNet, k: int = 2) -> torch.Tensor:
    """K paths that differ in every choice layer (path i uses candidate i mod m): no candidate is
    shared, the common case for large m and the worst one for the batched forward."""
    return torch.tensor([[i % m for m in model.choice_counts] for i in range(k)], dtype=torch.long)


def train_inputs(name: str, batch: int, device: torch.device, dtype=torch.float32, seed: int = 0):
    """A seeded model of ``name`` on ``device`` and a random batch of its input shape."""
    shape = TRAIN_MODELS[name][0]
    torch.manual_seed(seed)
    model = models.build(name, num_classes=10, in_channels=shape[0]).to(device=device, dtype=dtype).train()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, *shape), generator=g).to(device=device, dtype=dtype)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return model, x, y


def step_functions(model, x, y, paths, lam: float = 10.0) -> dict[str, Callable[[], None]]:
    """Zero-grad + loss + backward + SGD step, three ways: ``vanilla`` (CE on paths[0]), ``sors``
    (:func:`sors.losses.sors_loss` as training runs it), ``reference`` (sequential, ``.backward()``,
    on stock convolutions: the straightforward implementation as ensemble trainers run it; our models'
    first-conv fast path would otherwise speed it up too). The SGD step has lr 0, so every repeat
    does the same work on the same weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9)
    paths = paths.cpu()  # paths stay on the CPU: they pick modules, and .tolist() on a GPU tensor syncs

    def vanilla():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, paths[0]), y).backward()
        opt.step()

    def sors():
        opt.zero_grad(set_to_none=True)
        losses.backward_into(losses.sors_loss(model, x, y, lam=lam, paths=paths), params)
        opt.step()

    def reference():
        opt.zero_grad(set_to_none=True)
        with kernels.fast_input_gradients(False):  # chosen at forward time, kept by the graph
            parts = losses.sors_loss_reference(model, x, y, paths, lam=lam)
        parts.total.backward()
        opt.step()

    return {"vanilla": vanilla, "sors": sors, "reference": reference}


def train_batch(s: Settings, name: str) -> int:
    """The batch of the training-step figures for a model on this device (CPU: small for ResNets)."""
    shape, cpu_batch, gpu_batch = TRAIN_MODELS[name]
    chosen = {"sors_lenet5": s.lenet_batch, "sors_resnet18": s.resnet_batch}[name]
    return chosen or (gpu_batch if s.device.type == "cuda" else cpu_batch)


def case_train_step(s: Settings) -> list[Row]:
    """SORS step vs vanilla step (ratio), vs the sequential reference (speedup), and images/s."""
    rows = []
    for name in s.models:
        shape, batch = TRAIN_MODELS[name][0], train_batch(s, name)
        model, x, y = train_inputs(name, batch, s.device)
        fns = step_functions(model, x, y, distinct_paths(model))
        times = measure(fns, s.device, s.repeats, s.warmup)
        detail = {"batch": batch, "input": list(shape), "k": 2, "lambda": 10.0,
                  **{f"{k}_ms": ms(v) for k, v in times.items()},
                  "reference_ratio": round(paired_ratio(times, "reference", "vanilla"), 3)}
        rows.append(Row(f"train_step.{name}.ratio", round(paired_ratio(times, "sors", "vanilla"), 3),
                        "x vanilla step", detail))
        rows.append(Row(f"train_step.{name}.speedup_vs_reference",
                        round(paired_ratio(times, "reference", "sors"), 3), "x", {"batch": batch}))
        rows.append(Row(f"train_step.{name}.sors_images_per_s", round(batch / median(times["sors"]), 1),
                        "images/s", {f"{k}_images_per_s": round(batch / median(v), 1) for k, v in times.items()}))
    return rows


def einsum_orthogonality(grads: torch.Tensor) -> torch.Tensor:
    """The first implementation of the orthogonality loss (all pairs by einsum), for the ablation."""
    flat = grads.flatten(2)
    unit = flat / flat.norm(dim=2, keepdim=True).clamp_min(1e-12)
    k = unit.shape[0]
    cos = torch.einsum("ibd,jbd->ijb", unit, unit)
    i, j = torch.triu_indices(k, k, offset=1)
    return cos[i, j].pow(2).mean(dim=1).sum()


def sors_step_variant(model, x, y, paths, params, opt, lam=10.0, routing="blocks", fast_conv=True,
                      params_only=True, ortho=losses.orthogonality_loss) -> None:
    """The SORS step with each fast path switchable (same values, different cost)."""
    opt.zero_grad(set_to_none=True)
    k, b = paths.shape[0], x.shape[0]
    with kernels.fast_input_gradients(fast_conv):  # decided at forward time, kept by the graph
        stacked = x.detach().repeat(k, 1, 1, 1).requires_grad_()
        logits = model.forward_blocks(stacked, paths) if routing == "blocks" else \
            model(stacked, paths.repeat_interleave(b, dim=0))
    ce = F.cross_entropy(logits, y.repeat(k), reduction="none").view(k, b).mean(1).sum()
    grads = torch.autograd.grad(ce, stacked, create_graph=True)[0]
    total = ce + lam * ortho(grads.view(k, b, *x.shape[1:]))
    torch.autograd.backward(total, inputs=params if params_only else None)
    opt.step()


FAST_PATH_VARIANTS: dict[str, dict[str, Any]] = {
    "all fast paths": {},
    "sorted per-example routing": {"routing": "sort"},
    "built-in first-conv input gradient": {"fast_conv": False},
    "backward also w.r.t. the input": {"params_only": False},
    "einsum orthogonality loss": {"ortho": einsum_orthogonality},
}


def case_fastpaths(s: Settings) -> list[Row]:
    """The SORS step with one fast path off at a time, as a ratio to the vanilla step (sors_lenet5
    unless ``--ablation-model``)."""
    batch = train_batch(s, s.ablation_model)
    model, x, y = train_inputs(s.ablation_model, batch, s.device)
    paths = distinct_paths(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    steps = step_functions(model, x, y, paths)
    fns = {"vanilla": steps["vanilla"], "reference": steps["reference"]}
    for label, options in FAST_PATH_VARIANTS.items():
        fns[label] = (lambda o=options: sors_step_variant(model, x, y, paths, params, opt, **o))

    def reuse_ce_weight_grads():  # an alternative, not a default: dCE/dtheta from the create_graph pass
        opt.zero_grad(set_to_none=True)
        losses.backward_into(losses.sors_loss(model, x, y, lam=10.0, paths=paths, weight_grads=True), params)
        opt.step()

    fns["+ CE weight grads from the first backward"] = reuse_ce_weight_grads

    def sequential_on_fast_conv():  # the reference with only the first-conv fast path: what batching adds
        opt.zero_grad(set_to_none=True)
        losses.sors_loss_reference(model, x, y, paths, lam=10.0).total.backward()
        opt.step()

    fns["sequential paths (reference) on the fast first conv"] = sequential_on_fast_conv
    times = measure(fns, s.device, s.repeats, s.warmup)
    return [Row(f"fastpaths.{label}", round(paired_ratio(times, label, "vanilla"), 3), "x vanilla step",
                {"ms": ms(times[label]), "vanilla_ms": ms(times["vanilla"]), "model": s.ablation_model, "batch": batch})
            for label in fns if label != "vanilla"]


def case_compile(s: Settings) -> list[Row]:
    """torch.compile where it could help: (1) the SORS step (AOTAutograd has no double backward:
    expected to fall back to eager, and the row says why); (2) the first-order PGD input gradient
    of one extracted sub-network, compiled vs eager after compilation (compile time in detail)."""
    name = s.attack_model
    batch = s.eot_batch or 256
    model, x, y = train_inputs(name, batch, s.device)
    paths = distinct_paths(model)
    rows = []
    compiled_forward = torch.compile(model.forward_blocks)
    try:
        stacked = x.repeat(2, 1, 1, 1).requires_grad_()
        ce = F.cross_entropy(compiled_forward(stacked, paths), y.repeat(2))
        g = torch.autograd.grad(ce, stacked, create_graph=True)[0]
        losses.orthogonality_loss(g.view(2, batch, *x.shape[1:])).backward()
        rows.append(Row("compile.sors_step", 1.0, "works", {"model": name}))
    except Exception as err:  # noqa: BLE001 -- the expected outcome: report it, train eagerly
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        rows.append(Row("compile.sors_step", None, "falls back to eager", {"model": name, "reason": reason}))
    sub = model.extract_subnet(paths[0]).to(s.device).eval()

    def loss(inp):
        return F.cross_entropy(sub(inp), y, reduction="sum")

    compiled = torch.compile(loss)

    def gradient(fn):
        inp = x.detach().requires_grad_(True)
        value = fn(inp)
        return torch.autograd.grad(value, inp)[0]

    start = time.perf_counter()
    try:
        gradient(compiled)
    except Exception as err:  # noqa: BLE001 -- no compiler toolchain etc.: report, keep eager
        rows.append(Row("compile.pgd_gradient_speedup", None, "x eager", {"reason": str(err).splitlines()[0][:160]}))
        return rows
    compile_s = time.perf_counter() - start
    times = measure({"eager": lambda: gradient(loss), "compiled": lambda: gradient(compiled)}, s.device,
                    s.repeats, s.warmup)
    rows.append(Row("compile.pgd_gradient_speedup", round(paired_ratio(times, "eager", "compiled"), 3), "x eager",
                    {"model": name, "batch": batch, "compile_s": round(compile_s, 1),
                     **{f"{k}_ms": ms(v) for k, v in times.items()}}))
    return rows


# ---------------------------------------------------------------------------------------------
# memory


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


def memory_child(name: str, batch: int, which: str) -> dict[str, float]:
    """Run in a fresh process: the very first ``which`` step, so its peak is the step's own (nothing
    cached by the allocator yet). Returns MiB: rss_before, peak_rss, step_peak (= peak - before).

    VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's peak (it survives exec)."""
    kernels.retain_freed_memory()  # as in training
    model, x, y = train_inputs(name, batch, torch.device("cpu"))
    fn = step_functions(model, x, y, distinct_paths(model))[which]
    reset = reset_peak_rss()
    before = current_rss_bytes()
    fn()
    peak = peak_rss_bytes()
    mib = 1024 * 1024
    return {"rss_before_mib": round(before / mib, 1), "peak_rss_mib": round(peak / mib, 1),
            "step_peak_mib": round((peak - before) / mib, 1), "peak_reset": reset}


def _run_memory_child(name: str, batch: int, which: str, threads: int) -> dict[str, float]:
    code = (f"import json, torch; torch.set_num_threads({threads}); from pipeline.bench import memory_child; "
            f"print(json.dumps(memory_child({name!r}, {batch}, {which!r})))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpu_step_memory(fn: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Peak allocated CUDA memory of one call, MiB, above what was allocated before it."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    mib = 1024 * 1024
    return {"allocated_before_mib": round(before / mib, 1), "peak_allocated_mib": round(peak / mib, 1),
            "step_peak_mib": round((peak - before) / mib, 1)}


def case_memory(s: Settings) -> list[Row]:
    """One training step at batch 128 (CPU: sors_lenet5 in a fresh process each; GPU: both models)."""
    rows = []
    names = [n for n in s.models if s.device.type == "cuda" or n == "sors_lenet5"]
    batch = 8 if s.quick else 128
    for name in names:
        found = {}
        if s.device.type == "cpu":
            for which in ("vanilla", "sors", "reference"):
                found[which] = _run_memory_child(name, batch, which, torch.get_num_threads())
            key, unit = "peak_rss_mib", "MiB peak RSS"
        else:
            model, x, y = train_inputs(name, batch, s.device)
            fns = step_functions(model, x, y, distinct_paths(model))
            for which in ("vanilla", "sors", "reference"):
                fns[which]()  # allocator warm
                found[which] = gpu_step_memory(fns[which], s.device)
            key, unit = "step_peak_mib", "MiB peak allocated by the step"
        detail = {"batch": batch, **{f"{w}_{k}": v for w, r in found.items() for k, v in r.items()}}
        rows.append(Row(f"memory.{name}.sors_step", found["sors"][key], unit, detail))
        rows.append(Row(f"memory.{name}.ratio_vs_vanilla",
                        round(found["sors"]["step_peak_mib"] / max(found["vanilla"]["step_peak_mib"], 1e-9), 3),
                        "x (step's own peak)", {}))
    return rows


# ---------------------------------------------------------------------------------------------
# attacks


def attack_inputs(name: str, batch: int, device: torch.device, seed: int = 0):
    """A seeded model in eval mode and a random batch in [0, 1] with labels (attack cost does not
    depend on the pixel values, and a GPU machine may have no data set)."""
    model, x, y = train_inputs(name, batch, device, seed=seed)
    return model.eval(), x, y


def sequential_eot_gradient(model, x: torch.Tensor, y: torch.Tensor, samples: int) -> torch.Tensor:
    """The usual EOT gradient: ``samples`` sequential forward/backward passes (one path per example
    each), plain autograd. The baseline for the batched one."""
    total = torch.zeros_like(x)
    with models.per_example_sampling(model):
        for _ in range(samples):
            inp = x.detach().requires_grad_(True)
            loss = F.cross_entropy(model(inp), y, reduction="sum")
            total += torch.autograd.grad(loss, inp)[0]
    return total / samples


def _torchattacks():
    try:
        import torchattacks
        return torchattacks
    except Exception:  # noqa: BLE001 -- optional comparison: any import failure means "not installed"
        return None


def case_eot(s: Settings) -> list[Row]:
    """EOT-PGD (E draws per step) on sors_lenet5 (``--attack-model``): batched vs E sequential passes
    vs torchattacks."""
    from sors import attacks

    batch = s.eot_batch or (256 if s.device.type == "cuda" else 128)
    model, x, y = attack_inputs(s.attack_model, batch, s.device)
    eps, steps, e = 0.1, s.attack_steps, s.eot_samples
    batched = attacks.build("eot_pgd", model, eps, eot_samples=e, steps=steps)
    sequential = attacks.build("eot_pgd", model, eps, eot_samples=e, steps=steps)
    sequential.gradient = lambda adv, labels: sequential_eot_gradient(model, adv, labels, e)
    fns = {"batched": lambda: batched(x, y), "sequential": lambda: sequential(x, y)}
    ta = _torchattacks()
    if ta is not None:
        theirs = ta.EOTPGD(model, eps=eps, alpha=eps / 4, steps=steps, eot_iter=e, random_start=False)
        fns["torchattacks"] = lambda: theirs(x, y)
    times = measure(fns, s.device, s.repeats, s.warmup)
    detail = {"model": s.attack_model, "batch": batch, "eot_samples": e, "steps": steps, **{f"{k}_ms": ms(v) for k, v in times.items()}}
    rows = [Row("eot.speedup_vs_sequential", round(paired_ratio(times, "sequential", "batched"), 3), "x", detail)]
    rows.append(Row("eot.speedup_vs_torchattacks",
                    round(paired_ratio(times, "torchattacks", "batched"), 3) if ta else None, "x",
                    {} if ta else {"note": "torchattacks not installed"}))
    return rows


def case_pgd(s: Settings) -> list[Row]:
    """PGD images/s on one deterministic model (sors_lenet5, or ``--attack-model``, frozen on one
    path): ours vs torchattacks."""
    from sors import attacks

    ta = _torchattacks()
    batch = s.eot_batch or 256
    net, x, y = attack_inputs(s.attack_model, batch, s.device)
    model = models.freeze_path(net, distinct_paths(net)[0]).to(s.device).eval()
    eps, steps = 0.1, 7
    ours = attacks.build("pgd", model, eps, steps=steps)
    fns = {"ours": lambda: ours(x, y)}
    if ta is not None:
        theirs = ta.PGD(model, eps=eps, alpha=eps / 4, steps=steps, random_start=False)
        fns["torchattacks"] = lambda: theirs(x, y)
    times = measure(fns, s.device, s.repeats, s.warmup)
    rate = {k: round(batch / median(v), 1) for k, v in times.items()}
    detail = {"model": s.attack_model, "batch": batch, "steps": steps, **{f"{k}_images_per_s": v for k, v in rate.items()}}
    if ta is None:
        return [Row("pgd.ratio_vs_torchattacks", None, "x images/s", {**detail, "note": "torchattacks not installed"})]
    return [Row("pgd.ratio_vs_torchattacks", round(paired_ratio(times, "torchattacks", "ours"), 3),
                "x images/s", detail)]


# ---------------------------------------------------------------------------------------------
# fan-out


def bench_cell(n_examples: int, seed: int = 0, threads: int = 1) -> dict[str, float]:
    """One evaluation cell as the pipeline runs it: PGD on sors_lenet5 over ``n_examples`` test
    images through :func:`sors.evaluation.evaluate_cell` (a stand-in PGD loop where that module is
    missing). CPU, ``threads`` torch threads. Returns its accuracy and in-cell seconds."""
    start, saved_threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _cell(n_examples, seed, start)
    finally:
        torch.set_num_threads(saved_threads)


def _cell(n_examples: int, seed: int, start: float) -> dict[str, float]:
    kernels.retain_freed_memory()  # the same allocator setting in a Ray worker as in this process
    torch.manual_seed(seed)
    model = models.build("sors_lenet5").eval()
    try:
        from sors import data as data_lib
        images, labels = data_lib.load("fashion_mnist", "test", n=n_examples, seed=seed)
    except Exception:  # noqa: BLE001 -- no data set on this machine: random images cost the same
        g = torch.Generator().manual_seed(seed)
        images, labels = torch.rand(n_examples, 1, 28, 28, generator=g), torch.randint(0, 10, (n_examples,), generator=g)
    try:
        from sors import config as config_lib
        from sors import evaluation
    except ImportError:
        evaluation = None
    if evaluation is not None:
        result = evaluation.evaluate_cell(model, images, labels, config_lib.AttackConfig(name="pgd", eps=0.1),
                                          config_lib.EvalConfig(n_examples=n_examples, repeats=2, all_paths=4),
                                          seed=seed)
        accuracy = float(result.accuracy)
    else:  # stand-in: the same attack and scoring, by hand
        from sors import attacks
        adv = attacks.build("pgd", model, 0.1)(images, labels)
        with torch.no_grad():
            accuracy = float((model(adv).argmax(1) == labels).float().mean())
    return {"accuracy": accuracy, "seconds": time.perf_counter() - start}


def calibrate_cell(seconds: float) -> int:
    """Test images per cell so that one cell takes about ``seconds`` here (1 thread): grow the cell
    until it takes a fifth of that, then scale linearly (the first call only warms up)."""
    bench_cell(8)
    n = 32
    while True:
        took = bench_cell(n)["seconds"]
        if took >= seconds / 5 or n >= 1 << 16:
            break
        n *= 4
    return max(8, int(math.ceil(n * seconds * 1.05 / took)))


def _ray_cell():
    import ray
    return ray.remote(num_cpus=1, max_retries=0)(bench_cell)


def case_fanout(s: Settings) -> list[Row]:
    """Cells through Ray tasks vs in-process (serial: overhead per cell), then all cells at once on a
    local 2-CPU Ray and on a simulated 2-node cluster (scaling = serial seconds / wall seconds)."""
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError:
        return [Row("fanout.overhead", None, "of wall time", {"note": "ray not installed"})]
    n = calibrate_cell(s.cell_seconds)
    cells = s.fanout_cells
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray_options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    ray.init(num_cpus=2, object_store_memory=100 * 1024 * 1024, **ray_options)
    try:
        task = _ray_cell()
        ray.get([task.remote(8, seed=i) for i in range(2)])  # warm-up: start both workers, import torch
        local, remote, inner = [], [], []
        for i in range(cells):  # alternate which side goes first
            for side in (("local", "ray") if i % 2 == 0 else ("ray", "local")):
                start = time.perf_counter()
                if side == "local":
                    bench_cell(n, seed=i)
                    local.append(time.perf_counter() - start)
                else:
                    inner.append(ray.get(task.remote(n, seed=i))["seconds"])
                    remote.append(time.perf_counter() - start)
        start = time.perf_counter()
        ray.get([task.remote(n, seed=i) for i in range(cells)])
        parallel = time.perf_counter() - start
    finally:
        ray.shutdown()
    cluster_wall = None
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=80 * 1024 * 1024)
        ray.init(address=cluster.address, **ray_options)
        task = _ray_cell()
        ray.get([task.options(scheduling_strategy="SPREAD").remote(8, seed=i) for i in range(2)])
        start = time.perf_counter()
        ray.get([task.options(scheduling_strategy="SPREAD").remote(n, seed=i) for i in range(cells)])
        cluster_wall = time.perf_counter() - start
    finally:
        ray.shutdown()
        cluster.shutdown()
    serial = sum(local)
    overhead = median([(r - l) / r for r, l in zip(remote, local)])
    detail = {"cells": cells, "images_per_cell": n, "local_cell_s": round(median(local), 2),
              "ray_cell_s": round(median(remote), 2), "in_task_s": round(median(inner), 2)}
    return [Row("fanout.overhead", round(overhead, 4), "of wall time", detail),
            Row("fanout.local_2cpu_scaling", round(serial / parallel, 3), "x serial",
                {"wall_s": round(parallel, 2), "serial_s": round(serial, 2), "ideal": min(cells, 2)}),
            Row("fanout.cluster_2node_scaling", round(serial / cluster_wall, 3), "x serial",
                {"wall_s": round(cluster_wall, 2), "nodes": 2, "ideal": min(cells, 2)})]


# ---------------------------------------------------------------------------------------------
# registry and output

CASES: dict[str, Callable[[Settings], list[Row]]] = {
    "train_step": case_train_step,
    "fastpaths": case_fastpaths,
    "eot": case_eot,
    "pgd": case_pgd,
    "memory": case_memory,
    "fanout": case_fanout,
    "compile": case_compile,
}
DEFAULT_CASES = ("train_step", "fastpaths", "eot", "pgd", "memory", "fanout")  # compile: opt-in (slow to build)


def check_targets(rows: list[Row], targets: dict[str, tuple[str, float]]) -> None:
    """Mark each row that has a target as met or missed (in place)."""
    for row in rows:
        if row.name in targets and row.value is not None:
            op, bound = targets[row.name]
            row.target = f"{op} {bound:g}"
            row.ok = row.value <= bound if op == "<=" else row.value >= bound


def format_table(info: dict[str, Any], rows: list[Row]) -> str:
    """The human table: machine header, one line per figure."""
    head = (f"sors bench  {info['date']}  device={info['device']}"
            + (f" ({info['gpu']})" if "gpu" in info else "")
            + f"\ncpu={info['cpu']}  cores={info['cores']}  torch threads={info['torch_threads']}  "
              f"torch={info['torch']}  load={info['load_average']}"
              + (f" -> {info['load_average_end']}" if "load_average_end" in info else "")
              + f"  clock={info.get('clock', 'wall')}"
              + ("  freed memory retained" if info.get("retain_freed_memory") else ""))
    lines = [head, ""]
    width = max([len(r.name) for r in rows] + [10])
    lines.append(f"{'figure':<{width}}  {'value':>10}  {'unit':<30} {'target':<8} {'ok':<4} detail")
    for r in rows:
        value = "n/a" if r.value is None else f"{r.value:.4g}"
        ok = "" if r.ok is None else ("yes" if r.ok else "NO")
        detail = ", ".join(f"{k}={v}" for k, v in r.detail.items())
        lines.append(f"{r.name:<{width}}  {value:>10}  {r.unit:<30} {r.target or '':<8} {ok:<4} {detail}")
    return "\n".join(lines)


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
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help=f"comma-separated subset of {','.join(CASES)} (default: all but compile)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (median; >= 5 for a report)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of every side first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall (default; the targets' clock) or process CPU time (use with --threads 1 "
                             "on a shared machine)")
    parser.add_argument("--eot-samples", type=int, default=20)
    parser.add_argument("--fanout-cells", type=int, default=5)
    parser.add_argument("--cell-seconds", type=float, default=5.0, help="length of one fan-out cell")
    parser.add_argument("--models", default=",".join(TRAIN_MODELS),
                        help="super-networks of the train_step and memory cases (comma-separated)")
    parser.add_argument("--attack-model", default="sors_lenet5", choices=list(TRAIN_MODELS),
                        help="super-network of the eot and pgd cases")
    parser.add_argument("--ablation-model", default="sors_lenet5", choices=list(TRAIN_MODELS),
                        help="super-network of the fastpaths case")
    parser.add_argument("--lenet-batch", type=int, default=None)
    parser.add_argument("--resnet-batch", type=int, default=None)
    parser.add_argument("--eot-batch", type=int, default=None, help="images per attack batch (eot, pgd)")
    parser.add_argument("--attack-steps", type=int, default=3, help="PGD steps of the EOT attack")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test; figures not comparable)")
    parser.add_argument("--target", action="append", default=[], metavar="NAME=VALUE",
                        help="override a target threshold, e.g. train_step.sors_lenet5.ratio=5")
    parser.add_argument("--no-targets", action="store_true", help="report only; exit 0 whatever the figures")
    return parser


def parse_models(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in TRAIN_MODELS]
    if unknown or not names:
        raise ValueError(f"--models: unknown {unknown or names}; choose from {', '.join(TRAIN_MODELS)}")
    return names


def settings_from(args: argparse.Namespace) -> Settings:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    s = Settings(device=device, repeats=args.repeats, warmup=args.warmup, quick=args.quick,
                 eot_samples=args.eot_samples, fanout_cells=args.fanout_cells, cell_seconds=args.cell_seconds,
                 lenet_batch=args.lenet_batch, resnet_batch=args.resnet_batch, eot_batch=args.eot_batch,
                 attack_steps=args.attack_steps, models=parse_models(args.models),
                 attack_model=args.attack_model, ablation_model=args.ablation_model)
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
        return 2
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
        print(json.dumps({"machine": info, "settings": {**asdict(s), "device": str(s.device), "cases": cases},
                          "results": [asdict(r) for r in rows], "ok": ok}))
    else:
        print(format_table(info, rows))
        missed = [r.name for r in rows if r.ok is False]
        print("\nall targets met" if ok else f"\ntargets missed: {', '.join(missed)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
