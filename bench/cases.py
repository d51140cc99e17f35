"""The cases of ``sors bench`` (training step, fast-path ablation, torch.compile, memory, EOT, PGD;
the fan-out case is in :mod:`bench.fanout`) and the registry ``CASES`` the CLI and
``bench/gpu_bench.py`` run them from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from bench.adaptive import case_adaptive
from bench.fanout import case_fanout
from bench.harness import (
    TRAIN_MODELS,
    Row,
    Settings,
    current_rss_bytes,
    gpu_step_memory,
    measure,
    median,
    ms,
    paired_ratio,
    peak_rss_bytes,
    reset_peak_rss,
)
from bench.sampled import case_sampled
from bench.strength import case_strength
from sors import attacks, kernels, losses, models
from sors.losses_ablation import FAST_PATH_VARIANTS, sors_step_variant

REPO_ROOT = Path(__file__).resolve().parent.parent


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
        detail = {
            "batch": batch,
            "input": list(shape),
            "k": 2,
            "lambda": 10.0,
            **{f"{k}_ms": ms(v) for k, v in times.items()},
            "reference_ratio": round(paired_ratio(times, "reference", "vanilla"), 3),
        }
        rows.append(
            Row(f"train_step.{name}.ratio", round(paired_ratio(times, "sors", "vanilla"), 3), "x vanilla step", detail)
        )
        rows.append(
            Row(
                f"train_step.{name}.speedup_vs_reference",
                round(paired_ratio(times, "reference", "sors"), 3),
                "x",
                {"batch": batch},
            )
        )
        rows.append(
            Row(
                f"train_step.{name}.sors_images_per_s",
                round(batch / median(times["sors"]), 1),
                "images/s",
                {f"{k}_images_per_s": round(batch / median(v), 1) for k, v in times.items()},
            )
        )
    return rows


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
        fns[label] = lambda o=options: sors_step_variant(model, x, y, paths, params, opt, **o)

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
    return [
        Row(
            f"fastpaths.{label}",
            round(paired_ratio(times, label, "vanilla"), 3),
            "x vanilla step",
            {"ms": ms(times[label]), "vanilla_ms": ms(times["vanilla"]), "model": s.ablation_model, "batch": batch},
        )
        for label in fns
        if label != "vanilla"
    ]


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
    times = measure(
        {"eager": lambda: gradient(loss), "compiled": lambda: gradient(compiled)}, s.device, s.repeats, s.warmup
    )
    rows.append(
        Row(
            "compile.pgd_gradient_speedup",
            round(paired_ratio(times, "eager", "compiled"), 3),
            "x eager",
            {
                "model": name,
                "batch": batch,
                "compile_s": round(compile_s, 1),
                **{f"{k}_ms": ms(v) for k, v in times.items()},
            },
        )
    )
    return rows


# ---------------------------------------------------------------------------------------------
# memory


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
    return {
        "rss_before_mib": round(before / mib, 1),
        "peak_rss_mib": round(peak / mib, 1),
        "step_peak_mib": round((peak - before) / mib, 1),
        "peak_reset": reset,
    }


def _run_memory_child(name: str, batch: int, which: str, threads: int) -> dict[str, float]:
    code = (
        f"import json, torch; torch.set_num_threads({threads}); from bench.cases import memory_child; "
        f"print(json.dumps(memory_child({name!r}, {batch}, {which!r})))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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
        rows.append(
            Row(
                f"memory.{name}.ratio_vs_vanilla",
                round(found["sors"]["step_peak_mib"] / max(found["vanilla"]["step_peak_mib"], 1e-9), 3),
                "x (step's own peak)",
                {},
            )
        )
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
    detail = {
        "model": s.attack_model,
        "batch": batch,
        "eot_samples": e,
        "steps": steps,
        **{f"{k}_ms": ms(v) for k, v in times.items()},
    }
    rows = [Row("eot.speedup_vs_sequential", round(paired_ratio(times, "sequential", "batched"), 3), "x", detail)]
    rows.append(
        Row(
            "eot.speedup_vs_torchattacks",
            round(paired_ratio(times, "torchattacks", "batched"), 3) if ta else None,
            "x",
            {} if ta else {"note": "torchattacks not installed"},
        )
    )
    return rows


def case_pgd(s: Settings) -> list[Row]:
    """PGD images/s on one deterministic model (sors_lenet5, or ``--attack-model``, frozen on one
    path): ours vs torchattacks."""
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
    detail = {
        "model": s.attack_model,
        "batch": batch,
        "steps": steps,
        **{f"{k}_images_per_s": v for k, v in rate.items()},
    }
    if ta is None:
        return [Row("pgd.ratio_vs_torchattacks", None, "x images/s", {**detail, "note": "torchattacks not installed"})]
    return [
        Row("pgd.ratio_vs_torchattacks", round(paired_ratio(times, "torchattacks", "ours"), 3), "x images/s", detail)
    ]


# registry and output

CASES: dict[str, Callable[[Settings], list[Row]]] = {
    "train_step": case_train_step,
    "fastpaths": case_fastpaths,
    "eot": case_eot,
    "pgd": case_pgd,
    "memory": case_memory,
    "fanout": case_fanout,
    "compile": case_compile,
    "adaptive": case_adaptive,
    "strength": case_strength,
    "sampled": case_sampled,
}
# compile: opt-in (slow to build); adaptive, strength and sampled: opt-in (train a model, then minutes on a CPU)
DEFAULT_CASES = ("train_step", "fastpaths", "eot", "pgd", "memory", "fanout")
