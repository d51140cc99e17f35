"""Reports from the Parquet store: the paper-style table (Markdown + CSV) and PNG plots.

Table: one row per evaluated model (variants such as RS*/SORS* are rows of their own), clean
accuracy first, then each attack over its eps grid; every number is ``accuracy % [95% interval]``,
pooled over seeds (an image scored by several seeds counts once: :func:`pooled`). Plots (matplotlib,
Agg): accuracy vs eps per attack; the lambda sweep (Fig. 7, one panel per attack) when super-networks
with at least three lambdas were evaluated; the gradient-angle histogram (Fig. 6) and the training /
validation loss curves (Fig. 8) from the model records. Below the table (:mod:`pipeline.paper_report`):
the paper's published value beside ours and the adaptive suite's, Table 1's orthogonality vs transfer
success, and Table 8's parameter counts and inference cost of every model. Sanity cells (role "sanity") feed the flags column, not the table.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline import paper_report
from sors import attacks, models, stats
from sors.evaluation import CellResult, format_table
from sors.metrics import wilson_interval
from sors.worst_case import worst_case_by_eps
from tasks.cells import row_to_result

WORST = "worst"  # the column of the per-example worst case over every attack of a row (not an attack)


def attack_label(name: str) -> str:
    """The table label of an attack (its registry entry; the bare name for one no longer registered)."""
    if name == WORST:
        return "Worst case"
    return attacks.info(name)["label"] if name in attacks.available() else name


@dataclass(frozen=True)
class Column:
    attack: str
    eps: float
    samples: int | None = None  # set only for an attack evaluated with several eot_samples (Table 9's k)

    @property
    def label(self) -> str:
        name = attack_label(self.attack) + (f" k={self.samples}" if self.samples is not None else "")
        if self.attack in ("none",) or self.eps == 0:
            return name
        return f"{name} {eps_text(self.eps)}"


def eps_text(eps: float) -> str:
    """``25/255`` when eps is a whole number of 255ths (the paper's notation), else a decimal."""
    scaled = eps * 255
    return f"{round(scaled)}/255" if abs(scaled - round(scaled)) < 1e-6 else f"{eps:.4g}"


def _attack_rank(name: str) -> tuple:
    return (attacks.info(name)["order"] if name in attacks.available() else 2000 if name == WORST else 1000, name)


@dataclass(frozen=True)
class Cell:
    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    all_path_accuracy: float | None


def pooled(rows: list[dict]) -> Cell:
    """Pool the same cell over seeds without counting an image twice.

    Rows with per-example outcomes (schema v2): each example's correctness is averaged over the rows
    that scored it (matched on ``example_index``); the accuracy is the mean over distinct examples and
    the Wilson interval uses their number. Seeds re-score the same images (the test subset is fixed by
    ``data.seed``, not the cell seed), so repeated scorings narrow nothing. Rows without outcomes
    (schema v1, or a mix): mean accuracy over the rows, interval on the largest single row's ``n``.
    """
    if len(rows) == 1:
        r = rows[0]
        return Cell(r["accuracy"], r["ci_low"], r["ci_high"], r["n"], r.get("all_path_accuracy"))
    if all(stats.has_outcomes(r) for r in rows):
        acc, n = _pooled_examples(rows)
    else:
        n = max(int(r["n"]) for r in rows)
        total = sum(r["n"] for r in rows)
        acc = sum(r["correct"] for r in rows) / total if total else 0.0
    low, high = wilson_interval(acc, n)
    paths = [r["all_path_accuracy"] for r in rows if r.get("all_path_accuracy") is not None]
    return Cell(acc, low, high, n, sum(paths) / len(paths) if paths else None)


def _pooled_examples(rows: list[dict]) -> tuple[float, int]:
    """(accuracy over distinct examples, their number): per example the mean of its rows' correctness."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for r in rows:
        for index, correct in stats.outcomes(r).items():
            sums[index] = sums.get(index, 0.0) + correct
            counts[index] = counts.get(index, 0) + 1
    n = len(sums)
    return (sum(sums[i] / counts[i] for i in sums) / n if n else 0.0), n


def column_of(row: dict, rows: list[dict]) -> Column:
    """The table column of a row: its attack and eps, and its eot_samples when ``rows`` evaluate that
    attack with several (the gradient-ensemble PGD of Table 9 at k = 2..5)."""
    samples = {r.get("eot_samples") for r in rows if r["attack"] == row["attack"]}
    return Column(row["attack"], round(row["eps"], 9), row.get("eot_samples") if len(samples) > 1 else None)


def table_data(rows: list[dict], model_order: list[str] | None = None):
    """``(models, columns, cells, flags)``: ordered model labels, ordered columns, ``{(model, column): Cell}``
    and ``{model: [flags]}`` from stored rows (main-role cells in the table; flags from every cell)."""
    main = [r for r in rows if (r.get("role") or "main") == "main"]
    seen = []
    for r in sorted(main, key=lambda r: r["created_at"] or 0):
        if r["model"] not in seen:
            seen.append(r["model"])
    order = [m for m in (model_order or []) if m in seen] + [m for m in seen if m not in (model_order or [])]
    columns = sorted({column_of(r, main) for r in main}, key=lambda c: (_attack_rank(c.attack), c.samples or 0, c.eps))
    groups: dict[tuple, list[dict]] = {}
    for r in main:
        groups.setdefault((r["model"], column_of(r, main)), []).append(r)
    cells = {key: pooled(group) for key, group in groups.items()}
    for model in order:
        for eps, worst in worst_case_by_eps([r for r in main if r["model"] == model]).items():
            cells[(model, Column(WORST, eps))] = Cell(worst.accuracy, worst.ci_low, worst.ci_high, worst.n, None)
    columns += sorted({c for (_, c) in cells if c.attack == WORST}, key=lambda c: c.eps)
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
    lines.append(
        "Accuracy (%) with 95% Wilson intervals; eps on the pixel scale (x/255); n = test images per cell. "
        "'-' = not evaluated (EOT-style attacks run on randomized models only: on a deterministic "
        "model they equal PGD). Adaptive = the adaptive suite (per example the worst case over EOT-APGD "
        "on the expected softmax, AA-rand, ARC and Square-EOT): the headline; the other attack "
        "columns are what the paper's attacks report. Worst case = per example, the worst over every "
        "attack of the row. flags = sanity warnings (listed below)."
    )
    for model in models:
        for flag in flags.get(model, []):
            lines.append(f"- {model}: {flag}")
    extra = paper_report.sections(rows, models, pooled, eps_text, attack_label)
    return "\n".join(lines) + ("\n\n" + extra if extra else "")


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
                writer.writerow(
                    [
                        model,
                        c.attack,
                        f"{c.eps:.6f}",
                        f"{c.eps * 255:.2f}",
                        f"{cell.accuracy:.4f}",
                        f"{cell.ci_low:.4f}",
                        f"{cell.ci_high:.4f}",
                        cell.n,
                        "" if cell.all_path_accuracy is None else f"{cell.all_path_accuracy:.4f}",
                    ]
                )
    return out.getvalue()


def console_table(rows: list[dict], model_order: list[str] | None = None, title: str | None = None) -> str:
    """The table as ``sors.evaluation.format_table`` renders it (with its sanity section), else Markdown."""
    models, _, _, _ = table_data(rows, model_order)
    by_model = {
        m: [
            row_to_result(r, CellResult) for r in sorted(rows, key=lambda r: (r["attack"], r["eps"])) if r["model"] == m
        ]
        for m in models
    }
    by_model = {m: rs for m, rs in by_model.items() if rs}
    if not by_model:
        return "(no evaluation results)"
    return format_table(by_model, title=title)


def console_report(rows: list[dict], model_order: list[str] | None = None, title: str | None = None) -> str:
    """:func:`console_table`, then the paper's value beside ours for every cell that matches one."""
    entries = paper_report.comparison(rows, pooled, eps_text, attack_label)
    if model_order:
        rank = {label: i for i, label in enumerate(model_order)}
        entries.sort(key=lambda e: rank.get(e["model"], len(rank)))  # stable: attack and eps order kept
    section = paper_report.comparison_console(entries)
    return console_table(rows, model_order, title) + ("\n\n" + "\n".join(section) if section else "")


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
            points += [(c.eps, cells.get((model, c))) for c in columns if c.attack == attack and not c.samples]
            points = [(e * 255, cell) for e, cell in points if cell is not None]
            if not points:
                continue
            xs = [p[0] for p in points]
            ys = [100 * p[1].accuracy for p in points]
            err = [
                [max(0.0, 100 * (p[1].accuracy - p[1].ci_low)) for p in points],  # clamp float round-off
                [max(0.0, 100 * (p[1].ci_high - p[1].accuracy)) for p in points],
            ]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=2, label=model)
        ax.set_title(attack_label(attack))
        ax.set_xlabel("eps (x/255)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = min(5, max(1, len(labels)))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7)
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(labels) - 1) // ncol + 1), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _super_network(arch: str) -> bool:
    return arch in models.available() and models.info(arch)["super_network"]


LAMBDA_PLOT_MIN = 3  # fewer lambda values draw no curve worth a figure (two points: a line)


def plot_lambda(rows: list[dict], path: Path) -> Path | None:
    """Fig. 7: accuracy vs lambda for single-path super-networks, one panel per attack, one line per
    eps and the clean accuracy in every panel; None when fewer than :data:`LAMBDA_PLOT_MIN` lambdas
    were evaluated."""
    rows = [
        r for r in rows if (r.get("role") or "main") == "main" and _super_network(r["arch"]) and r["average_paths"] == 1
    ]
    lambdas = sorted({r["lambda"] for r in rows})
    if len(lambdas) < LAMBDA_PLOT_MIN:
        return None
    clean: dict[float, list[dict]] = {}
    panels: dict[str, dict[float, dict[float, list[dict]]]] = {}
    for r in rows:
        if r["attack"] == "none":
            clean.setdefault(r["lambda"], []).append(r)
        else:
            panels.setdefault(r["attack"], {}).setdefault(r["eps"], {}).setdefault(r["lambda"], []).append(r)
    names = sorted(panels, key=_attack_rank) or ["none"]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        if clean:
            xs = sorted(clean)
            ax.plot(
                xs, [100 * pooled(clean[x]).accuracy for x in xs], marker="s", color="k", linewidth=2.5, label="clean"
            )
        for eps, by_lambda in sorted(panels.get(name, {}).items()):
            xs = sorted(by_lambda)
            ax.plot(xs, [100 * pooled(by_lambda[x]).accuracy for x in xs], marker="o", label=f"eps {eps_text(eps)}")
        ax.set_title(attack_label(name) if name != "none" else "clean")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("lambda (orthogonality weight)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gradient_angles(records: list[dict], path: Path) -> Path | None:
    """Fig. 6: histogram of angles (degrees) between input gradients of random sub-network pairs
    (ensemble members for ensembles), one per model; 90 degrees = orthogonal."""
    series = {
        r["label"]: [math.degrees(math.acos(max(-1.0, min(1.0, c)))) for c in r.get("grad_cosines") or []]
        for r in records
        if r
    }
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


def write_report(
    rows: list[dict],
    records: list[dict],
    out_dir: str | Path,
    title: str | None = None,
    model_order: list[str] | None = None,
) -> list[Path]:
    """Write ``table.md``, ``table.csv`` and the plots into ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (
        ("table.md", markdown_table(rows, model_order, title)),
        ("table.csv", csv_table(rows, model_order)),
    ):
        (out / name).write_text(text + ("\n" if not text.endswith("\n") else ""))
        written.append(out / name)
    for plot in (
        plot_accuracy_vs_eps(rows, out / "accuracy_vs_eps.png", model_order),
        plot_lambda(rows, out / "lambda_sweep.png"),
        plot_gradient_angles(records, out / "gradient_angles.png"),
        paper_report.plot_loss_curves(records, out / "loss_curves.png", _pyplot),
    ):
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
