"""Report sections that set our cells beside the paper: the published value next to ours and the
adaptive suite's (Tables 2-10), gradient orthogonality against transfer success (Table 1), each
model's parameter count and inference cost (Table 8), and the training / validation loss curves
(Fig. 8). :func:`sections` returns the Markdown; :func:`plot_loss_curves` the figure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from sors import attacks as attacks_lib
from sors import paper
from sors import train as train_lib
from sors.data import spec as data_spec
from sors.models.factory import wrap_average
from tasks import storage

COST_BATCH = 64  # images per timed forward
COST_REPEATS = 3


def _main(rows: list[dict]) -> list[dict]:
    return [r for r in rows if (r.get("role") or "main") == "main"]


def _pct(cell) -> str:
    return f"{100 * cell.accuracy:.1f} [{100 * cell.ci_low:.1f}, {100 * cell.ci_high:.1f}]"


def comparison(rows: list[dict], pooled, eps_text, attack_label) -> list[dict]:
    """One entry per cell of ours that matches a published value: model, attack, eps, the paper's
    value (its table and data set), ours pooled over seeds and the adaptive suite's at the same eps.
    ``pooled``, ``eps_text``, ``attack_label``: the report's helpers (same pooling as the main table)."""
    main = _main(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in main:
        groups.setdefault((r["model"], r["attack"], round(r["eps"], 9), r.get("eot_samples")), []).append(r)
    out = []
    for (model, attack, eps, samples), group in groups.items():
        first = group[0]
        value = paper.lookup(first.get("dataset") or "", model, attack, eps, first.get("n_ops"), samples)
        if value is None:
            continue
        adaptive = groups.get((model, "adaptive", eps, None)) or [
            r for (m, a, e, _), g in groups.items() if m == model and a == "adaptive" and e == eps for r in g
        ]
        label = attack_label(attack) + (f" k={samples}" if value.k is not None else "")
        out.append(
            {
                "model": model,
                "attack": label,
                "eps": "-" if eps == 0 else eps_text(eps),
                "paper": value.value,
                "table": value.table,
                "paper_dataset": paper.DATASET_NAMES[value.dataset],
                "dataset": first["dataset"],
                "ours": pooled(group),
                "adaptive": pooled(adaptive) if adaptive else None,
                "_order": (attacks_lib.info(attack)["order"], samples or 0, eps),
            }
        )
    models = list(dict.fromkeys(r["model"] for r in main))
    out.sort(key=lambda e: (models.index(e["model"]), e["_order"]))
    return out


def comparison_console(entries: list[dict]) -> list[str]:
    """The paper-vs-ours section for a terminal: one line per (model, attack), values over the eps
    grid as paper / ours / adaptive suite, in % (intervals are in the report's table.md)."""
    if not entries:
        return []
    series: dict[tuple, list[dict]] = {}
    for e in entries:
        series.setdefault((e["model"], e["attack"]), []).append(e)
    width = max(len(f"{m} {a}") for m, a in series)
    lines = ["The paper beside ours (%, paper / ours / adaptive suite; eps on the 0-255 scale):"]
    for (model, attack), group in series.items():
        eps = "/".join(e["eps"].replace("/255", "") for e in group)
        paper_values = "/".join(f"{e['paper']:.1f}" for e in group)
        ours = "/".join(f"{100 * e['ours'].accuracy:.1f}" for e in group)
        adaptive = "/".join(f"{100 * e['adaptive'].accuracy:.1f}" if e["adaptive"] else "-" for e in group)
        source = ", ".join(dict.fromkeys(f"T{e['table']}, {e['paper_dataset']}" for e in group))
        lines.append(
            f"  {f'{model} {attack}':<{width}}  @{eps}: paper ({source}) {paper_values} | ours {ours} | adaptive {adaptive}"
        )
    datasets = sorted({e["paper_dataset"] for e in entries})
    lines.append(
        f"  (the paper's values are for {', '.join(datasets)}; ours on {', '.join(sorted({e['dataset'] for e in entries}))})"
    )
    return lines


def comparison_markdown(entries: list[dict]) -> list[str]:
    """The paper-vs-ours section (empty when no cell matches a published one)."""
    if not entries:
        return []
    lines = [
        "### The paper beside ours",
        "",
        "| Model | Attack | eps | Paper (table, data set) | Ours [95% CI] | Adaptive suite [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        adaptive = _pct(e["adaptive"]) if e["adaptive"] else "-"
        lines.append(
            f"| {e['model']} | {e['attack']} | {e['eps']} | {e['paper']:.1f} (T{e['table']}, {e['paper_dataset']}) "
            f"| {_pct(e['ours'])} | {adaptive} |"
        )
    ours = sorted({e["dataset"] for e in entries})
    theirs = sorted({e["paper_dataset"] for e in entries})
    lines += [
        "",
        f"Ours on {', '.join(ours)}; the paper's numbers are for {', '.join(theirs)} "
        "(the paper has no Fashion-MNIST experiment: its MNIST numbers are the reference there). "
        "Adaptive suite = our adaptive attack on the same model at the same eps (the headline).",
    ]
    return lines


def table1_markdown(rows: list[dict], eps_text) -> list[str]:
    """Table 1: per transfer cell crafted on a named source, the source-target gradient orthogonality
    (1 - mean |cos| of input gradients) and the transfer success rate (1 - accuracy under it)."""
    entries = []
    for r in _main(rows):
        extra = json.loads(r.get("extra") or "{}") if isinstance(r.get("extra"), str) else (r.get("extra") or {})
        if "source_grad_orthogonality" in extra and extra.get("source") not in (None, "undefended target"):
            entries.append(
                (
                    extra["source"],
                    r["model"],
                    r["attack"],
                    r["eps"],
                    extra["source_grad_orthogonality"],
                    1.0 - r["accuracy"],
                )
            )
    if not entries:
        return []
    lines = [
        "### Table 1: gradient orthogonality vs transfer success",
        "",
        "| Source | Target | Attack | eps | Gradient orthogonality | Attack success rate (%) |",
        "|---|---|---|---|---|---|",
    ]
    for source, model, attack, eps, ortho, success in sorted(entries, key=lambda e: (e[0], e[2], e[3], -e[4])):
        lines.append(f"| {source} | {model} | {attack} | {eps_text(eps)} | {ortho:.3f} | {100 * success:.1f} |")
    lines += [
        "",
        "Orthogonality = 1 - mean |cos| between the source's and the target's input gradients on 64 test "
        "images (0: the same gradients). The paper: higher orthogonality, lower success rate.",
    ]
    return lines


def model_cost(row: dict) -> tuple[int, float] | None:
    """(parameters, ms per image on this machine's CPU) of a row's checkpoint and variant, or None when
    the checkpoint cannot be read here. Ensembles and RS*/SORS* (k paths) cost k forwards."""
    if not row.get("checkpoint_uri"):
        return None
    try:
        model, cfg, _ = train_lib.load_checkpoint(storage.local_copy(row["checkpoint_uri"]))
    except Exception:  # noqa: BLE001 -- a remote or deleted checkpoint: the cost column says '-'
        return None
    model = wrap_average(model, int(row.get("average_paths") or 1)).eval()
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    ds = data_spec(cfg.data.name)
    x = torch.rand(COST_BATCH, ds.in_channels, ds.image_size, ds.image_size)
    with torch.no_grad():
        model(x)  # warm-up
        start = time.perf_counter()
        for _ in range(COST_REPEATS):
            model(x)
    return params, 1000 * (time.perf_counter() - start) / (COST_REPEATS * COST_BATCH)


def cost_markdown(rows: list[dict], models: list[str]) -> list[str]:
    """Table 8: parameters (millions) and inference cost per image of every model of the report,
    with the paper's parameter count where Table 8 gives one."""
    first = {}
    for r in _main(rows):
        first.setdefault(r["model"], r)
    if not any(r.get("checkpoint_uri") for r in first.values()):
        return []
    lines = [
        "### Model size and inference cost (Table 8)",
        "",
        "| Model | Parameters (M) | Paper (M) | Inference (ms / image, CPU) |",
        "|---|---|---|---|",
    ]
    for model in [m for m in models if m in first]:
        cost = model_cost(first[model])
        published = paper.parameters(first[model].get("dataset") or "", model)
        params, ms = (f"{cost[0] / 1e6:.3f}", f"{cost[1]:.3f}") if cost else ("-", "-")
        lines.append(
            f"| {model} | {params} | {published.value:g} | {ms} |"
            if published
            else f"| {model} | {params} | - | {ms} |"
        )
    lines += [
        "",
        f"Timed here: {COST_REPEATS} forwards of {COST_BATCH} images after a warm-up, one thread pool, "
        "no attack. A super-network runs one path per forward (the cost of one sub-network).",
    ]
    return lines


def sections(rows: list[dict], models: list[str], pooled, eps_text, attack_label) -> str:
    """Every section of this module as Markdown (each omitted when it has nothing to show)."""
    parts = [
        comparison_markdown(comparison(rows, pooled, eps_text, attack_label)),
        table1_markdown(rows, eps_text),
        cost_markdown(rows, models),
    ]
    return "\n\n".join("\n".join(p) for p in parts if p)


def plot_loss_curves(records: list[dict], path: Path, pyplot) -> Path | None:
    """Fig. 8: training loss and validation loss (cross-entropy on the test subset) per epoch, one
    line per trained model; None when no record has a per-epoch history."""
    series = {r["label"]: r["history"] for r in records if r and r.get("history")}
    if not series:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), squeeze=False)
    for label, history in series.items():
        epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
        axes[0][0].plot(epochs, [h.get("loss") for h in history], marker="o", label=label)
        if any("val_loss" in h for h in history):
            axes[0][1].plot(
                [e for e, h in zip(epochs, history) if "val_loss" in h],
                [h["val_loss"] for h in history if "val_loss" in h],
                marker="o",
                label=label,
            )
    for ax, title in zip(axes[0], ("training loss (CE + orthogonality + KD)", "validation loss (CE, test subset)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * (len(labels) // 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
