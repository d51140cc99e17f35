"""Paper-style text tables of evaluation cells (:class:`sors.evaluation.CellResult` or anything
with its fields): one row per model, clean accuracy, then each attack over its eps grid in the
order of the attack registry (the adaptive suite first), then the per-example worst case over
every attack of the row, and the sanity warnings underneath."""

from __future__ import annotations

from typing import Any

from sors import checks
from sors.attacks.base import info
from sors.worst_case import worst_case_by_eps


def _column_key(r: Any) -> tuple:
    return (r.attack, r.steps, r.eot_samples)


def _column_order(key: tuple) -> tuple:
    name = key[0]
    return (info(name)["order"], name, key[1] or 0, key[2] or 0)


def _column_label(key: tuple, keys: list[tuple], eps_values: list[float]) -> str:
    name, steps, samples = key
    label = "clean" if name == "none" else info(name)["label"]
    variants = [k for k in keys if k[0] == name]
    if len(variants) > 1:
        if len({k[2] for k in variants}) > 1 and samples:
            label += f" k={samples}"
        if len({k[1] for k in variants}) > 1 and steps:
            label += f" {steps}st"
    if any(e > 0 for e in eps_values) and name != "none":
        label += " @" + "/".join(f"{e * 255:.4g}" for e in eps_values)
    return label


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _cell_lines(results: list[Any], randomized: bool) -> list[str]:
    lines = [
        "/".join(_pct(r.accuracy) for r in results),
        "±" + "/".join(f"{100 * (r.ci_high - r.ci_low) / 2:.1f}" for r in results),
    ]
    if randomized:
        lines.append(
            "∀" + "/".join(_pct(r.all_path_accuracy) if r.all_path_accuracy is not None else "-" for r in results)
        )
    return lines


def _worst_lines(by_eps: dict, eps_values: list[float]) -> list[str]:
    cells = [by_eps.get(e) for e in eps_values]
    return [
        "/".join(_pct(c.accuracy) if c else "-" for c in cells),
        "±" + "/".join(f"{100 * (c.ci_high - c.ci_low) / 2:.1f}" if c else "-" for c in cells),
    ]


def _render(rows: list[list[list[str]]]) -> list[str]:
    """Rows of multi-line cells -> text lines with aligned columns."""
    widths = [max(len(line) for row in rows for line in row[c]) for c in range(len(rows[0]))]
    out = []
    for i, row in enumerate(rows):
        height = max(len(cell) for cell in row)
        for h in range(height):
            out.append(" | ".join((cell[h] if h < len(cell) else "").ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            out.append("-+-".join("-" * w for w in widths))
    return out


def format_table(results_by_model: dict[str, list[Any]], num_classes: int = 10, title: str | None = None) -> str:
    """A paper-style text table: one row per model; columns clean, then each attack over its eps
    grid (in /255): accuracy % per eps, '±' the 95% interval half-widths, '∀' (randomized models)
    the every-path accuracy. Sanity cells and every sanity warning (per cell and across cells) are
    listed under the table."""
    main = {m: [r for r in rs if r.extra.get("role", "main") == "main"] for m, rs in results_by_model.items()}
    keys = sorted({_column_key(r) for rs in main.values() for r in rs}, key=_column_order)
    eps_by_key = {k: sorted({r.eps for rs in main.values() for r in rs if _column_key(r) == k}) for k in keys}
    worst = {m: worst_case_by_eps(rs) for m, rs in main.items()}
    worst_eps = sorted({e for w in worst.values() for e in w})
    header = [["model"]] + [[_column_label(k, keys, eps_by_key[k])] for k in keys]
    if worst_eps:
        header.append(["worst @" + "/".join(f"{e * 255:.4g}" for e in worst_eps)])
    rows = [header]
    for model_name, rs in main.items():
        randomized = any(r.all_path_accuracy is not None for r in rs)
        row = [[model_name]]
        for k in keys:
            cell = sorted((r for r in rs if _column_key(r) == k), key=lambda r: r.eps)
            row.append(_cell_lines(cell, randomized) if cell else ["-"])
        if worst_eps:
            row.append(_worst_lines(worst[model_name], worst_eps))
        rows.append(row)
    lines = [title] if title else []
    lines.append(
        "Accuracy (%) under attack; eps on the 0-255 scale; ± = 95% interval half-width; "
        "∀ = correct under every path (exact where the paths were enumerated); "
        "worst = per example, the worst case over every attack of the row"
    )
    lines += _render(rows)
    lines += _sanity_section(results_by_model, num_classes)
    return "\n".join(lines)


def _sanity_section(results_by_model: dict[str, list[Any]], num_classes: int) -> list[str]:
    lines = ["", "Sanity checks:"]
    for model_name, rs in results_by_model.items():
        extra_cells = [r for r in rs if r.extra.get("role") == "sanity"]
        if extra_cells:
            lines.append(
                f"  {model_name}: sanity cells "
                + ", ".join(f"{checks._describe(r)}: {_pct(r.accuracy)}%" for r in extra_cells)
            )
        cross = checks.cross_cell_flags(rs, num_classes)
        # stored results may already carry their cross-cell flags: list each warning once
        warnings = [
            f"{checks._describe(r)}: {flag}"
            for i, r in enumerate(rs)
            for flag in r.sanity_flags
            if flag not in cross.get(i, [])
        ]
        warnings += [flag for i in sorted(cross) for flag in cross[i]]
        if warnings:
            lines += [f"  WARNING {model_name}: {w}" for w in warnings]
        else:
            lines.append(f"  {model_name}: no warnings")
    return lines
