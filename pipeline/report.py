"""Reports from the Parquet store: the paper-style table (Markdown + CSV) and PNG plots.

Table: one row per evaluated model (variants such as RS*/SORS* are rows of their own), clean
accuracy first, then each attack over its eps grid; every number is ``accuracy % [95% interval]``,
pooled over seeds. Plots (matplotlib, Agg): accuracy vs eps per attack; the lambda sweep (Fig. 7)
when super-networks with several lambdas were evaluated; the gradient-angle histogram (Fig. 6) from
the model records. Sanity cells (role "sanity") feed the flags column, not the table.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from sors import attacks, models
from sors.evaluation import CellResult, format_table
from sors.metrics import wilson_interval
from tasks.cells import row_to_result


def attack_label(name: str) -> str:
    """The table label of an attack (its registry entry; the bare name for one no longer registered)."""
    return attacks.info(name)["label"] if name in attacks.available() else name


@dataclass(frozen=True)
class Column:
    attack: str
    eps: float

    @property
    def label(self) -> str:
        name = attack_label(self.attack)
        if self.attack in ("none",) or self.eps == 0:
            return name
        return f"{name} {eps_text(self.eps)}"


def eps_text(eps: float) -> str:
    """``25/255`` when eps is a whole number of 255ths (the paper's notation), else a decimal."""
    scaled = eps * 255
    return f"{round(scaled)}/255" if abs(scaled - round(scaled)) < 1e-6 else f"{eps:.4g}"


def _attack_rank(name: str) -> tuple:
    return (attacks.info(name)["order"] if name in attacks.available() else 1000, name)


@dataclass(frozen=True)
class Cell:
    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    all_path_accuracy: float | None


def pooled(rows: list[dict]) -> Cell:
    """Pool the same cell over seeds: summed correct / summed n, Wilson interval on the pooled n."""
    if len(rows) == 1:
        r = rows[0]
        return Cell(r["accuracy"], r["ci_low"], r["ci_high"], r["n"], r.get("all_path_accuracy"))
    n = sum(r["n"] for r in rows)
    acc = sum(r["correct"] for r in rows) / n if n else 0.0
    low, high = wilson_interval(acc, n)
    paths = [r["all_path_accuracy"] for r in rows if r.get("all_path_accuracy") is not None]
    return Cell(acc, low, high, n, sum(paths) / len(paths) if paths else None)


def table_data(rows: list[dict], model_order: list[str] | None = None):
    """``(models, columns, cells, flags)``: ordered model labels, ordered columns, ``{(model, column): Cell}``
    and ``{model: [flags]}`` from stored rows (main-role cells in the table; flags from every cell)."""
    main = [r for r in rows if (r.get("role") or "main") == "main"]
    seen = []
    for r in sorted(main, key=lambda r: r["created_at"] or 0):
        if r["model"] not in seen:
            seen.append(r["model"])
    order = [m for m in (model_order or []) if m in seen] + [m for m in seen if m not in (model_order or [])]
    columns = sorted({Column(r["attack"], round(r["eps"], 9)) for r in main}, key=lambda c: (_attack_rank(c.attack), c.eps))
    groups: dict[tuple, list[dict]] = {}
    for r in main:
        groups.setdefault((r["model"], Column(r["attack"], round(r["eps"], 9))), []).append(r)
    cells = {key: pooled(group) for key, group in groups.items()}
    flags: dict[str, list[str]] = {}
    for r in rows:
        for flag in r.get("sanity_flags") or []:
            flags.setdefault(r["model"], [])
            if flag not in flags[r["model"]]:
                flags[r["model"]].append(flag)
    return order, columns, cells, flags


def _fmt(cell: Cell | None) -> str:
    if cell is None:
        return "-"
    return f"{100 * cell.accuracy:.1f} [{100 * cell.ci_low:.1f}, {100 * cell.ci_high:.1f}]"


def markdown_table(rows: list[dict], model_order: list[str] | None = None, title: str | None = None) -> str:
    """The paper-style table as Markdown: accuracy % [95% interval] per model and (attack, eps)."""
    models, columns, cells, flags = table_data(rows, model_order)
    if not models:
        return "(no evaluation results)"
    header = ["Model"] + [c.label for c in columns] + ["n", "flags"]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for model in models:
        n = max((cells[(model, c)].n for c in columns if (model, c) in cells), default=0)
        values = [_fmt(cells.get((model, c))) for c in columns]
        lines.append("| " + " | ".join([model] + values + [str(n), str(len(flags.get(model, [])))]) + " |")
    lines.append("")
    lines.append("Accuracy (%) with 95% Wilson intervals; eps on the pixel scale (x/255); n = test images per cell. "
                 "'-' = not evaluated (EOT-style attacks run on randomized models only: on a deterministic "
                 "model they equal PGD). flags = sanity warnings (listed below).")
    for model in models:
        for flag in flags.get(model, []):
            lines.append(f"- {model}: {flag}")
    return "\n".join(lines)


def csv_table(rows: list[dict], model_order: list[str] | None = None) -> str:
    """Long-form CSV: one line per (model, attack, eps) with accuracy, interval, n, all-path accuracy."""
    models, columns, cells, _ = table_data(rows, model_order)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["model", "attack", "eps", "eps_255", "accuracy", "ci_low", "ci_high", "n", "all_path_accuracy"])
    for model in models:
        for c in columns:
            cell = cells.get((model, c))
            if cell:
                writer.writerow([model, c.attack, f"{c.eps:.6f}", f"{c.eps * 255:.2f}", f"{cell.accuracy:.4f}",
                                 f"{cell.ci_low:.4f}", f"{cell.ci_high:.4f}", cell.n,
                                 "" if cell.all_path_accuracy is None else f"{cell.all_path_accuracy:.4f}"])
    return out.getvalue()


def console_table(rows: list[dict], model_order: list[str] | None = None, title: str | None = None) -> str:
    """The table as ``sors.evaluation.format_table`` renders it (with its sanity section), else Markdown."""
    models, _, _, _ = table_data(rows, model_order)
    by_model = {m: [row_to_result(r, CellResult) for r in sorted(rows, key=lambda r: (r["attack"], r["eps"]))
                    if r["model"] == m] for m in models}
    by_model = {m: rs for m, rs in by_model.items() if rs}
    if not by_model:
        return "(no evaluation results)"
    return format_table(by_model, title=title)


# ---------------------------------------------------------------- plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy_vs_eps(rows: list[dict], path: Path, model_order: list[str] | None = None) -> Path | None:
    """One panel per attack: accuracy (%) vs eps (x/255) per model, 95% intervals as error bars;
    clean accuracy drawn at eps = 0."""
    models, columns, cells, _ = table_data(rows, model_order)
    attacks = [a for a in dict.fromkeys(c.attack for c in columns) if a != "none"]
    attacks = [a for a in attacks if any(c.eps > 0 for c in columns if c.attack == a)]
    if not attacks:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(attacks), figsize=(4 * len(attacks), 3.4), squeeze=False, sharey=True)
    for ax, attack in zip(axes[0], attacks):
        for model in models:
            points = [(0.0, cells.get((model, Column("none", 0.0))))]
            points += [(c.eps, cells.get((model, c))) for c in columns if c.attack == attack]
            points = [(e * 255, cell) for e, cell in points if cell is not None]
            if not points:
                continue
            xs = [p[0] for p in points]
            ys = [100 * p[1].accuracy for p in points]
            err = [[max(0.0, 100 * (p[1].accuracy - p[1].ci_low)) for p in points],  # clamp float round-off
                   [max(0.0, 100 * (p[1].ci_high - p[1].accuracy)) for p in points]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=2, label=model)
        ax.set_title(attack_label(attack))
        ax.set_xlabel("eps (x/255)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _super_network(arch: str) -> bool:
    return arch in models.available() and models.info(arch)["super_network"]


def plot_lambda(rows: list[dict], path: Path) -> Path | None:
    """Fig. 7: accuracy vs lambda for single-path super-networks, clean and each (attack, eps); None
    when fewer than two lambdas were evaluated."""
    rows = [r for r in rows if (r.get("role") or "main") == "main" and _super_network(r["arch"])
            and r["average_paths"] == 1]
    lambdas = sorted({r["lambda"] for r in rows})
    if len(lambdas) < 2:
        return None
    plt = _pyplot()
    series: dict[str, dict[float, list[dict]]] = {}
    for r in rows:
        key = "clean" if r["attack"] == "none" else f"{attack_label(r['attack'])} {eps_text(r['eps'])}"
        series.setdefault(key, {}).setdefault(r["lambda"], []).append(r)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, by_lambda in sorted(series.items(), key=lambda kv: (kv[0] != "clean", kv[0])):
        xs = sorted(by_lambda)
        ys = [100 * pooled(by_lambda[x]).accuracy for x in xs]
        ax.plot(xs, ys, marker="o", label=key, linewidth=2.5 if key == "clean" else 1)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("lambda (orthogonality weight)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gradient_angles(records: list[dict], path: Path) -> Path | None:
    """Fig. 6: histogram of angles (degrees) between input gradients of random sub-network pairs
    (ensemble members for ensembles), one per model; 90 degrees = orthogonal."""
    series = {r["label"]: [math.degrees(math.acos(max(-1.0, min(1.0, c)))) for c in r.get("grad_cosines") or []]
              for r in records if r}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, angles in series.items():
        mean_abs = sum(abs(math.cos(math.radians(a))) for a in angles) / len(angles)
        ax.hist(angles, bins=36, range=(0, 180), alpha=0.5, density=True, label=f"{label} (mean |cos| {mean_abs:.2f})")
    ax.axvline(90, color="k", linewidth=0.8, linestyle="--")
    ax.set_xlabel("angle between input gradients (degrees)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(rows: list[dict], records: list[dict], out_dir: str | Path, title: str | None = None,
                 model_order: list[str] | None = None) -> list[Path]:
    """Write ``table.md``, ``table.csv`` and the plots into ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("table.md", markdown_table(rows, model_order, title)), ("table.csv", csv_table(rows, model_order))):
        (out / name).write_text(text + ("\n" if not text.endswith("\n") else ""))
        written.append(out / name)
    for plot in (plot_accuracy_vs_eps(rows, out / "accuracy_vs_eps.png", model_order),
                 plot_lambda(rows, out / "lambda_sweep.png"),
                 plot_gradient_angles(records, out / "gradient_angles.png")):
        if plot:
            written.append(plot)
    return written


def model_order(records: list[dict]) -> list[str]:
    """Row order from model records: each trial's label, then its variants' labels."""
    order = []
    for r in records:
        if r:
            order.append(r["label"])
            order += [v["label"] for v in r.get("variants") or []]
    return order
