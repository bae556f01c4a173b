"""Collect finished runs into tables and a trade-off figure: score (hard mode) against relative FLOPs.

A run folder is finished when it holds `metrics.json`; folders without one are still training and are
skipped silently. `dynbert report` calls `write_report`, which writes `report.md`, `results.csv`,
`tradeoff.png` and `tradeoff.svg` (any subset) and prints one table per task.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from dynbert.errors import DynbertError, atomic_write_bytes, atomic_write_text, check_writable_folder
from dynbert.rundir import METRICS_FILE, read_metrics

FORMATS = ("md", "csv", "png", "svg")

FLOPS_NOTE = ("FLOPs are counted analytically per example on its real (unpadded) tokens, after pruning; "
              "the FLOPs ratio is relative to the un-gated model on the same examples (1.0 = no pruning).")

# results.csv puts these first, in this order; the rest follow sorted (metrics.*, kept_per_layer.<i>, extras).
_CSV_FIRST = ["run_dir", "task", "metric", "baseline", "lambda", "seed", "score", "score_soft",
              "flops_per_example", "baseline_flops_per_example", "flops_ratio", "cue_kept",
              "train_seconds", "version"]
# The quantities summarize() averages over seeds: summary key -> how to read it from a run.
_SUMMARY_FIELDS = {
    "score": lambda run: run["score"],
    "score_soft": lambda run: run["score_soft"],
    "flops_ratio": lambda run: run["flops_ratio"],
    "flops_per_example": lambda run: run["flops_per_example"],
    "kept_last": lambda run: run["kept_per_layer"][-1] if run["kept_per_layer"] else None,
    "cue_kept": lambda run: run.get("cue_kept"),
}


# --------------------------------------------------------------------------------------------- loading

def load_runs(folder: Path) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Every metrics.json at any depth under `folder`: (good runs, each with "run_dir" added; [(bad file, why)])."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DynbertError(f"{folder} is not a folder: pass a sweep or run folder that holds metrics.json files.")
    runs, bad = [], []
    for path in sorted(folder.rglob(METRICS_FILE)):
        if not path.is_file():
            continue
        data, why = read_metrics(path.parent)
        if why:
            bad.append((path, why))
            continue
        runs.append({**data, "run_dir": path.parent})
    return runs, bad


# ------------------------------------------------------------------------------------------ summarizing

def _mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of the non-null values; std is None below two values."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    array = np.asarray(values)
    return float(array.mean()), (float(array.std(ddof=1)) if len(values) > 1 else None)


def _group_key(run: dict) -> tuple:
    # A baseline's λ means nothing: all of a task's baseline runs form one group, whatever λ they carry.
    return (run["task"], bool(run["baseline"]), None if run["baseline"] else float(run["lambda"]))


def _row_order(row: dict) -> tuple:
    """Tasks alphabetically; within a task the baseline first, then λ ascending."""
    return (row["task"], not row["baseline"], row["lambda"] if row["lambda"] is not None else -math.inf)


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (task, baseline, λ), averaged over seeds.

    Each row has task, metric, baseline, lambda (None for the baseline), n, seeds, then `<q>_mean` and
    `<q>_std` for q in score, score_soft, flops_ratio, flops_per_example, kept_last (kept fraction at
    the last layer) and cue_kept (None where no run has it). std is the sample standard deviation over
    seeds (n - 1), None for a single run. `delta` is score_mean minus the same task's gated λ=0
    score_mean (None without a λ=0 run); `reduction` is 1 / flops_ratio_mean (×-fold fewer FLOPs).
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        groups[_group_key(run)].append(run)
    rows = []
    for (task, baseline, lam), members in groups.items():
        metrics = Counter(run["metric"] for run in members)
        row = {"task": task, "metric": "/".join(sorted(metrics)), "baseline": baseline, "lambda": lam,
               "n": len(members), "seeds": sorted(run["seed"] for run in members)}
        for name, read in _SUMMARY_FIELDS.items():
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std([read(run) for run in members])
        ratio = row["flops_ratio_mean"]
        row["reduction"] = 1.0 / ratio if ratio and ratio > 0 else None
        rows.append(row)
    reference = {row["task"]: row["score_mean"] for row in rows if not row["baseline"] and row["lambda"] == 0.0}
    for row in rows:
        ref = reference.get(row["task"])
        row["delta"] = row["score_mean"] - ref if ref is not None else None
    return sorted(rows, key=_row_order)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, sorted by x (then index).

    Lower x (FLOPs ratio) and higher y (score) are better; q dominates p when q is at least as good on
    both and strictly better on one. Identical points do not dominate each other: all of them stay.
    Points with a NaN coordinate are never on the front.
    """
    valid = [i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))]

    def dominated(i: int) -> bool:
        x, y = points[i]
        return any(qx <= x and qy >= y and (qx < x or qy > y) for qx, qy in (points[j] for j in valid))

    return sorted((i for i in valid if not dominated(i)), key=lambda i: (points[i][0], i))


def latest_sweep(outputs: Path) -> Path:
    """The most recently modified folder under `outputs/sweeps/`."""
    sweeps = Path(outputs) / "sweeps"
    folders = [p for p in sweeps.iterdir() if p.is_dir()] if sweeps.is_dir() else []
    if not folders:
        raise DynbertError(f"No sweep folder under {sweeps}: run `dynbert sweep` first or pass a folder to report on.")
    return max(folders, key=lambda p: (p.stat().st_mtime_ns, p.name))


# ------------------------------------------------------------------------------------------- formatting

def format_lambda(lam: float | None) -> str:
    """Short λ text: 0.1, 0.003, 1e-5; "baseline" for the un-gated run."""
    if lam is None:
        return "baseline"
    text = f"{lam:.3g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def format_flops(value: float | None) -> str:
    """1234567 -> '1.23 M'."""
    if value is None:
        return "—"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g}"


def _pm(mean: float | None, std: float | None, fmt: str = "{:.3f}") -> str:
    if mean is None:
        return "—"
    return fmt.format(mean) + (f"±{fmt.format(std)}" if std is not None else "")


def _percent(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{100 * mean:.1f}" + (f"±{100 * std:.1f}" if std is not None else "") + "%"


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of one task's table (the same for the console and Markdown)."""
    metric = rows[0]["metric"]
    with_cue = any(row["cue_kept_mean"] is not None for row in rows)
    header = ["λ", f"{metric} (hard)", "Δ vs λ=0", "FLOPs/example", "FLOPs ratio", "reduction",
              "kept, last layer"] + (["cue kept"] if with_cue else []) + ["runs"]
    cells = []
    for row in rows:
        line = [format_lambda(row["lambda"]),
                _pm(row["score_mean"], row["score_std"]),
                "—" if row["delta"] is None else f"{row['delta']:+.3f}",
                format_flops(row["flops_per_example_mean"]),
                _pm(row["flops_ratio_mean"], row["flops_ratio_std"]),
                "—" if row["reduction"] is None else f"{row['reduction']:.2f}×",
                _percent(row["kept_last_mean"], row["kept_last_std"])]
        if with_cue:
            line.append(_percent(row["cue_kept_mean"], row["cue_kept_std"]))
        line.append(str(row["n"]))
        cells.append(line)
    return header, cells


def _by_task(rows: list[dict]) -> dict[str, list[dict]]:
    tasks: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        tasks[row["task"]].append(row)
    return dict(sorted(tasks.items()))


def _markdown(folder: Path, runs: list[dict], bad: list, rows: list[dict], figure: str | None) -> str:
    def md_line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = ["# dynbert report", "",
             f"{len(runs)} finished runs from `{folder}`" + (f"; {len(bad)} unreadable metrics.json skipped." if bad else "."),
             "", FLOPS_NOTE,
             "Scores are in hard mode (pruned tokens physically removed); ± is the sample standard deviation "
             "over seeds; Δ is the difference to the same task's λ=0 gated run.", ""]
    for task, task_rows in _by_task(rows).items():
        header, cells = _table(task_rows)
        lines += [f"## {task} ({task_rows[0]['metric']})", "", md_line(header),
                  "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += [md_line(line) for line in cells]
        lines.append("")
    if figure:
        lines += [f"![Score against relative FLOPs]({figure})", ""]
    if bad:
        lines += ["## Skipped files", ""] + [f"- `{path}`: {why}" for path, why in bad] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- CSV

def _flatten(value, prefix: str, into: dict) -> None:
    """{"metrics": {"f1": 0.8}, "kept_per_layer": [1, 0.5]} -> metrics.f1, kept_per_layer.0, kept_per_layer.1."""
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), into)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _flatten(item, f"{prefix}.{i}", into)
    else:
        into[prefix] = value


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _csv(folder: Path, runs: list[dict]) -> str:
    flat_runs = []
    for run in sorted(runs, key=lambda r: (*_row_order({"task": r["task"], "baseline": r["baseline"],
                                                        "lambda": _group_key(r)[2]}), r["seed"], str(r["run_dir"]))):
        flat: dict = {}
        _flatten({k: v for k, v in run.items() if k != "run_dir"}, "", flat)
        try:
            flat["run_dir"] = run["run_dir"].relative_to(folder).as_posix()
        except ValueError:
            flat["run_dir"] = str(run["run_dir"])
        flat_runs.append(flat)
    present = set().union(*flat_runs) if flat_runs else set()
    columns = [c for c in _CSV_FIRST if c in present] + sorted(present - set(_CSV_FIRST), key=_natural)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for flat in flat_runs:
        writer.writerow({k: ("" if v is None else v) for k, v in flat.items()})
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ figure

# Label offsets (points) tried in turn: rings of growing radius; past the first ring a leader line is drawn.
_DIRECTIONS = [(1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1), (1, 0), (-1, 0)]
_RINGS = [5, 12, 20, 30, 42]


def _overlaps(box, boxes) -> bool:
    return any(box.x0 < b.x1 and b.x0 < box.x1 and box.y0 < b.y1 and b.y0 < box.y1 for b in boxes)


def _place_labels(ax, renderer, items: list[tuple[float, float, str]], obstacles: list) -> list:
    """Annotate each (x, y, text) at the first candidate offset whose text box stays inside the axes and
    overlaps no marker, legend or earlier label; far offsets get a thin leader line to their point."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    inside = ax.get_window_extent(renderer)
    placed, annotations = [], []
    for k, (x, y, text) in enumerate(items):
        ann = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=7, color="0.15",
                          annotation_clip=False, bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.75),
                          arrowprops=dict(arrowstyle="-", color="0.55", lw=0.6, shrinkA=1, shrinkB=3))
        # Alternate the preferred side (above/below) from one point to the next, so neighbours split up.
        directions = _DIRECTIONS if k % 2 == 0 else [(dx, -dy) for dx, dy in _DIRECTIONS]
        fallback = None
        for ring in _RINGS:
            for dx, dy in directions:
                ann.xyann = (dx * ring, dy * ring)
                ann.set_horizontalalignment({1: "left", -1: "right", 0: "center"}[dx])
                ann.set_verticalalignment({1: "bottom", -1: "top", 0: "center"}[dy])
                ann.update_positions(renderer)
                box = Text.get_window_extent(ann, renderer)
                if fallback is None and not _overlaps(box, placed):
                    fallback = (ann.xyann, ann.get_horizontalalignment(), ann.get_verticalalignment(), box)
                contained = (box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0 and box.y1 <= inside.y1)
                if contained and not _overlaps(box, placed + obstacles):
                    break
            else:
                continue
            break
        else:  # nowhere free inside the axes: the first spot clear of other labels, else the nearest one
            if fallback is not None:
                ann.xyann, ha, va, box = fallback
                ann.set_horizontalalignment(ha)
                ann.set_verticalalignment(va)
            else:
                ann.xyann = (_RINGS[0], _RINGS[0])
                ann.set_horizontalalignment("left")
                ann.set_verticalalignment("bottom")
                ann.update_positions(renderer)
                box = Text.get_window_extent(ann, renderer)
        ann.arrow_patch.set_visible(math.hypot(*ann.xyann) > 1.5 * _RINGS[0] * math.sqrt(2))
        placed.append(Bbox.from_extents(box.x0 - 1, box.y0 - 1, box.x1 + 1, box.y1 + 1))
        annotations.append(ann)
    return annotations


def _y_label(metric: str) -> str:
    unit = "correlation" if any(word in metric.lower() for word in ("corr", "pearson", "spearman", "matthews", "mcc")) \
        else "fraction"
    return f"{metric}, hard mode ({unit})"


def plot_tradeoff(rows: list[dict]):
    """One panel per task: score (hard mode) against relative FLOPs, λ labels, baseline star, Pareto front.

    Returns a matplotlib Figure drawn on the Agg canvas (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import Bbox

    tasks = _by_task(rows)
    ncols = min(len(tasks), 3) or 1
    nrows = math.ceil(len(tasks) / ncols) or 1
    fig = Figure(figsize=(5.2 * ncols, 4.2 * nrows), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(tasks):]:
        ax.set_visible(False)

    panels = []
    for ax, (task, task_rows) in zip(axes, tasks.items()):
        drawable = [r for r in task_rows if r["score_mean"] is not None and r["flops_ratio_mean"] is not None
                    and math.isfinite(r["score_mean"]) and math.isfinite(r["flops_ratio_mean"])]
        gated = [r for r in drawable if not r["baseline"]]
        base = [r for r in drawable if r["baseline"]]
        xs = [r["flops_ratio_mean"] for r in gated]
        ys = [r["score_mean"] for r in gated]
        ax.axvline(1.0, color="0.8", lw=0.8, zorder=0)
        for r in base:
            ax.axhline(r["score_mean"], color="tab:red", lw=0.8, ls=":", alpha=0.7, zorder=0)
        if gated:
            front = pareto_front(list(zip(xs, ys)))
            ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="tab:blue", lw=1.2,
                    ls="--", alpha=0.8, label="Pareto front (gated)", zorder=1)
            for r, x, y in zip(gated, xs, ys):
                if r["score_std"] is not None or r["flops_ratio_std"] is not None:
                    ax.errorbar(x, y, xerr=r["flops_ratio_std"], yerr=r["score_std"], fmt="none",
                                ecolor="tab:blue", elinewidth=0.8, capsize=2, alpha=0.7, zorder=2)
            ax.scatter(xs, ys, s=28, color="tab:blue", edgecolor="white", linewidth=0.5, zorder=3,
                       label="gated model (label: λ)")
        for r in base:
            if r["score_std"] is not None or r["flops_ratio_std"] is not None:
                ax.errorbar(r["flops_ratio_mean"], r["score_mean"], xerr=r["flops_ratio_std"], yerr=r["score_std"],
                            fmt="none", ecolor="tab:red", elinewidth=0.8, capsize=2, zorder=2)
            ax.scatter([r["flops_ratio_mean"]], [r["score_mean"]], marker="*", s=160, color="tab:red",
                       edgecolor="black", linewidth=0.5, zorder=4, label="un-gated baseline")
        all_x = xs + [r["flops_ratio_mean"] for r in base]
        x_err = [r["flops_ratio_std"] or 0.0 for r in gated + base]
        ax.set_xlim(0.0, max([1.05] + [x + e + 0.03 for x, e in zip(all_x, x_err)]))
        ax.margins(y=0.18)
        metric = task_rows[0]["metric"]
        ax.set_xlabel("relative FLOPs per example (× un-gated; 1.0 = no pruning)")
        ax.set_ylabel(_y_label(metric))
        ax.set_title(f"{task} — {metric} (hard mode)")
        ax.grid(True, color="0.92", lw=0.6)
        ax.set_axisbelow(True)
        legend = ax.legend(loc="lower right", fontsize=7, framealpha=0.9) if (gated or base) else None
        items = [(x, y, f"λ={format_lambda(r['lambda'])}") for r, x, y in zip(gated, xs, ys)]
        items = [(r["flops_ratio_mean"], r["score_mean"], "baseline") for r in base] + items
        # What labels must not cover, in data units with a pad in points: markers (the star is larger than
        # a dot) and error bars with their caps.
        shapes = [(x, y, x, y, 4.0) for x, y in zip(xs, ys)]
        shapes += [(r["flops_ratio_mean"], r["score_mean"], r["flops_ratio_mean"], r["score_mean"], 7.5) for r in base]
        for r in gated + base:
            x, y, xe, ye = r["flops_ratio_mean"], r["score_mean"], r["flops_ratio_std"] or 0.0, r["score_std"] or 0.0
            shapes += [(x - xe, y, x + xe, y, 2.5), (x, y - ye, x, y + ye, 2.5)]
        panels.append((ax, legend, items, shapes))

    # Lay the figure out once, freeze it, then place labels against the final pixel positions.
    fig.canvas.draw()
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    for ax, legend, items, shapes in panels:
        obstacles = []
        for x0, y0, x1, y1, pad in shapes:
            (px0, py0), (px1, py1) = ax.transData.transform([(x0, y0), (x1, y1)])
            r = renderer.points_to_pixels(pad)
            obstacles.append(Bbox.from_extents(px0 - r, py0 - r, px1 + r, py1 + r))
        if legend is not None:
            obstacles.append(legend.get_window_extent(renderer))
        _place_labels(ax, renderer, items, obstacles)
    return fig


def _figure_bytes(fig, fmt: str) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ report

def _check_formats(formats) -> list[str]:
    if isinstance(formats, str):
        formats = formats.split(",")
    wanted = list(dict.fromkeys(f.strip().lower().lstrip(".") for f in formats if f.strip()))
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown:
        raise DynbertError(f"Unknown report format {', '.join(map(repr, unknown))}: choose from {', '.join(FORMATS)}.")
    return wanted


def _print_tables(console, rows: list[dict]) -> None:
    from rich.table import Table

    for task, task_rows in _by_task(rows).items():
        header, cells = _table(task_rows)
        table = Table(title=f"{task}: {task_rows[0]['metric']} (hard mode)", title_justify="left")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for line in cells:
            table.add_row(*line)
        console.print(table)
    console.print(FLOPS_NOTE, style="dim", markup=False, highlight=False)


def write_report(folder: Path, out: Path | None = None, formats: tuple[str, ...] = FORMATS,
                 console=None) -> list[Path]:
    """Summarize every finished run under `folder`; write the requested files into `out or folder`.

    Prints a warning per unreadable metrics.json and a table per task. Returns the written paths.
    """
    from rich.console import Console
    from rich.markup import escape

    wanted = _check_formats(formats)
    console = console or Console()
    folder = Path(folder)
    out = Path(out) if out is not None else folder
    check_writable_folder(out, "--out")
    runs, bad = load_runs(folder)
    for path, why in bad:
        console.print(f"[yellow]warning:[/] skipped {escape(str(path))}: {escape(why)}", highlight=False, soft_wrap=True)
    if not runs:
        if bad:
            listed = "; ".join(f"{path} ({why})" for path, why in bad)
            raise DynbertError(f"No usable run under {folder}: every metrics.json is bad: {listed}.")
        raise DynbertError(f"No finished run under {folder}: no metrics.json found (unfinished runs have none).")
    seen: dict[tuple, list[Path]] = defaultdict(list)
    for run in runs:
        seen[(*_group_key(run), run["seed"])].append(run["run_dir"])
    for (task, baseline, lam, seed), dirs in seen.items():
        if len(dirs) > 1:
            console.print(f"[yellow]warning:[/] {len(dirs)} runs share task {escape(task)}, "
                          f"λ {format_lambda(lam)}, seed {seed}; all are averaged: "
                          + escape(", ".join(map(str, dirs))), highlight=False)

    rows = summarize(runs)
    _print_tables(console, rows)

    written = []
    figure = None
    if "png" in wanted or "svg" in wanted:
        figure = plot_tradeoff(rows)
    for fmt in wanted:
        if fmt == "md":
            path = out / "report.md"
            shown = "tradeoff.png" if "png" in wanted else "tradeoff.svg" if "svg" in wanted else None
            atomic_write_text(path, _markdown(folder, runs, bad, rows, shown))
        elif fmt == "csv":
            path = out / "results.csv"
            atomic_write_text(path, _csv(folder, runs))
        else:
            path = out / f"tradeoff.{fmt}"
            atomic_write_bytes(path, _figure_bytes(figure, fmt))
        written.append(path)
    return written
