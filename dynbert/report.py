"""Collect finished runs into tables and a trade-off figure: score (hard mode) against relative FLOPs.

A run folder is finished when it holds `metrics.json`; folders without one are still training and are
skipped silently. `dynbert report` calls `write_report`, which writes `report.md`, `results.csv`,
`tradeoff.png` and `tradeoff.svg` (any subset) and prints one table per task; `render_table` gives one
Markdown table alone (`--table`: runs, compare, best), the text README.md and docs/ embed. Runs group
by their whole identity: task, method, knob value, and the config keys in which runs of the same task
and method differ (the variant, e.g. method.score=cls_attention), read from config.yaml beside
metrics.json (`rundir.run_identity`). Each task's panel overlays the methods, one colour each, each
with its own Pareto front. Files written before dynbert had several methods lack `method` and `knob`: they are the
paper's gates swept over λ (or the baseline), as `rundir.read_metrics` fills them in. A knob's label
and off value are its method's YAML's (`declarations.py`). Scores show in points (×100), as GLUE
papers give them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from dynbert.console import print_table
from dynbert.declarations import TARGET, Knob, default_method, method_declaration, method_knob
from dynbert.errors import DynbertError, atomic_write_bytes, atomic_write_text, check_writable_folder
from dynbert.rundir import CONFIG_FILE, METRICS_FILE, read_metrics, run_identity

FORMATS = ("md", "csv", "png", "svg")
TABLES = ("runs", "compare", "best")
"""What `--table` prints: every task's table of runs, the methods side by side at equal knob value, and
each method's largest FLOPs reduction within a point of the baseline."""

FLOPS_NOTE = ("FLOPs are counted analytically per example on its real (unpadded) tokens, after pruning; "
              "the FLOPs ratio is relative to the un-gated model on the same examples (1.0 = no pruning).")
TRIVIAL = "always the most frequent class"
"""The row (and column) of the score a model gets by always answering the dev set's most frequent class."""
WITHIN = 0.01
"""How far below the baseline's mean score a knob value may be and still count in `--table best`: a point."""

# results.csv puts these first, in this order; the rest follow sorted (metrics.*, kept_per_layer.<i>, extras).
_CSV_FIRST = ["run_dir", "task", "method", "knob", "knob_value", "variant", "metric", "baseline", "lambda", "seed",
              "score", "score_soft",
              "flops_per_example", "baseline_flops_per_example", "flops_ratio", "cue_kept",
              "train_seconds", "version"]
# The quantities summarize() averages over seeds: summary key -> how to read it from a run.
_SUMMARY_FIELDS = {
    "score": lambda run: run["score"],
    "score_soft": lambda run: run["score_soft"],
    "flops_ratio": lambda run: run["flops_ratio"],
    "train_flops_ratio": lambda run: _number(run.get("train_flops_ratio")),
    "flops_per_example": lambda run: run["flops_per_example"],
    "kept_last": lambda run: run["kept_per_layer"][-1] if run["kept_per_layer"] else None,
    "cue_kept": lambda run: run.get("cue_kept"),
    "agreement": lambda run: run.get("hard_soft_agreement"),
}
METHOD_ORDER = ("gates", "power_bert", "ltp", "topk", "random")
"""Tables and legends list the methods in this order (others follow, alphabetically)."""
SEED_KEYS = ("seed", "method.seed")
"""Identity keys a group averages over: the seed, and random's hash seed, which follows it."""
_LEFT = ("task", "method", "variant", "knob")
"""Table columns of words, aligned left; the others hold numbers."""


# --------------------------------------------------------------------------------------------- loading

def load_runs(folder: Path) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Every metrics.json at any depth under `folder`: (good runs, each with "run_dir", "identity" and
    "variant" added (`_assign_variants`); [(bad file, why)])."""
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
        run = {**data, "run_dir": path.parent}
        run["identity"] = _identity(run)
        runs.append(run)
    _assign_variants(runs)
    return runs, bad


def _identity(run: dict) -> dict[str, str | None] | None:
    """The run's identity (``rundir.run_identity`` of its config.yaml) as a group compares it: less the
    seeds (averaged), and with its own knob mapped to None, not this run's to compare (the row's value
    already), where another run of the method may have it (keep = 0.5 beside a top-k FLOPs target).
    None without a readable config.yaml: such a run groups by its knob alone."""
    try:
        cfg = OmegaConf.load(run["run_dir"] / CONFIG_FILE)
    except Exception:  # noqa: BLE001 - absent, unreadable or not YAML: the run's metrics still count
        return None
    if not isinstance(cfg, DictConfig):
        return None
    identity: dict[str, str | None] = {key: value for key, value in run_identity(cfg).items() if key not in SEED_KEYS}
    if run["knob"] is not None:
        identity[run["knob"]] = None
    return identity


def _assign_variants(runs: list[dict]) -> None:
    """Set each run's `variant`: ((key, value), ...) for the identity keys in which the runs of one task
    and its method differ (on any task: the same recipe is labelled alike on every task, so it stays one
    column of the compare table), sorted by key, less those not its own to compare (None in its identity);
    () where none differ, and for a run without config.yaml.

    A key one config lacks counts as null there: a key added to conf/ since is null where it means
    nothing, and older runs must not split off for it.
    """
    families: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        if run["identity"] is not None:
            families[(run["task"], run["method"])].append(run["identity"])
    differing = {family: sorted(key for key in set().union(*members)
                                if len({identity.get(key, "null") for identity in members} - {None}) > 1)
                 for family, members in families.items()}
    by_method: dict[str, set] = defaultdict(set)
    for (_, method), keys in differing.items():
        by_method[method].update(keys)
    for run in runs:
        identity = run["identity"]
        keys = sorted(by_method[run["method"]]) if identity is not None else []
        run["variant"] = tuple((key, identity.get(key, "null")) for key in keys
                               if identity.get(key, "null") is not None)


def _number(value) -> float | None:
    """An optional metrics.json number (trivial_score, train_flops_ratio), or None: metrics_problem checks
    only the keys every run has, so anything but a finite number counts as absent."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# ------------------------------------------------------------------------------------------ summarizing

def _mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of the non-null values; std is None below two values."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    array = np.asarray(values)
    return float(array.mean()), (float(array.std(ddof=1)) if len(values) > 1 else None)


def _group_key(run: dict) -> tuple:
    """(task, baseline, method, variant, knob, knob value).

    A baseline's knob means nothing: a task's baseline runs of one variant form one group, whatever λ they carry.
    """
    if run["baseline"]:
        return (run["task"], True, run["method"], run["variant"], None, None)
    value = run["knob_value"]
    return (run["task"], False, run["method"], run["variant"], run["knob"], None if value is None else float(value))


def _method_rank(method: str) -> tuple:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _knob_rank(knob: str | None) -> tuple:
    """A method's own knob before a FLOPs target (λ before keep: by key)."""
    return (knob == TARGET.key, knob or "")


def _row_order(row: dict) -> tuple:
    """Tasks alphabetically; within a task the baseline first, then by method, variant, knob, and knob value
    ascending."""
    value = row["knob_value"]
    return (row["task"], not row["baseline"], _method_rank(row["method"]), row["variant"], _knob_rank(row["knob"]),
            value if value is not None else -math.inf)


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (task, method, variant, knob value), averaged over seeds; the baseline is one row per
    task (per variant).

    Each row has task, metric, baseline, method, variant (as in `load_runs`), identity (its runs' config
    identity, None without config.yaml), knob (`lambda`, `method.keep`, `method.target`; None for the
    baseline), knob_value, lambda (the knob value of a λ method, else None), n, seeds, then `<q>_mean`
    and `<q>_std` for q in score, score_soft, flops_ratio, train_flops_ratio, flops_per_example,
    kept_last (kept fraction at the last layer), cue_kept and agreement (hard/soft prediction
    agreement; None where no run has it). std is the sample standard deviation over seeds (n - 1),
    None for a single run. `delta` is score_mean minus the same task, method and variant's score_mean
    with the knob off (its declared ``off_at``: λ = 0, keep = 1), None without such a run; the baseline
    row is compared with dynbert's default method (the paper's gates) at λ = 0. `delta_baseline` is
    score_mean minus the task's un-pruned baseline's (None without one): what "within 1 point" is
    measured by. Where a task has several baseline variants, a row is compared with the one whose
    variant its config matches (`_matching`).
    `reduction` is 1 / flops_ratio_mean (×-fold fewer FLOPs). `trivial_score` is the task's score of
    always answering the most frequent dev class (the first run of the task, by folder, that holds
    one; None if none does). `warned` counts the runs whose metrics.json holds warnings (a collapse to
    one class, pruning that did nothing, rounding that changed the model).
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        groups[_group_key(run)].append(run)
    trivial: dict[str, float] = {}
    for run in sorted(runs, key=lambda run: str(run["run_dir"])):
        value = _number(run.get("trivial_score"))
        if value is not None:
            trivial.setdefault(run["task"], value)
    rows = []
    for (task, baseline, method, variant, knob, value), members in groups.items():
        metrics = Counter(run["metric"] for run in members)
        row = {"task": task, "metric": "/".join(sorted(metrics)), "baseline": baseline, "method": method,
               "variant": variant,
               "identity": next((run["identity"] for run in members if run["identity"] is not None), None),
               "knob": knob, "knob_value": value, "lambda": value if knob == "lambda" else None,
               "n": len(members), "seeds": sorted(run["seed"] for run in members),
               "warned": sum(1 for run in members if run.get("warnings")), "trivial_score": trivial.get(task)}
        for name, read in _SUMMARY_FIELDS.items():
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std([read(run) for run in members])
        ratio = row["flops_ratio_mean"]
        row["reduction"] = 1.0 / ratio if ratio and ratio > 0 else None
        rows.append(row)
    knob_off = [row for row in rows if not row["baseline"] and row["knob_value"] is not None
                and row["knob_value"] == _off(row["method"], row["knob"])]
    baselines = [row for row in rows if row["baseline"]]
    reference = default_method()
    for row in rows:
        method = reference if row["baseline"] else row["method"]
        ref = _matching(row, [r for r in knob_off if r["task"] == row["task"] and r["method"] == method])
        row["delta"] = row["score_mean"] - ref["score_mean"] if ref is not None else None
        base = _matching(row, [r for r in baselines if r["task"] == row["task"]])
        row["delta_baseline"] = row["score_mean"] - base["score_mean"] if base is not None else None
    return sorted(rows, key=_row_order)


def _matching(row: dict, candidates: list[dict]) -> dict | None:
    """The one candidate row (a baseline, a method's knob-off row) whose variant `row`'s config agrees
    with; None when none or several do. A candidate's `method.*` keys bind only rows of its own method:
    the baseline's method.mask_attention says nothing about the gates'. A row without config.yaml
    matches only a candidate without a variant."""
    def agrees(candidate: dict) -> bool:
        if row["identity"] is None:
            return not candidate["variant"]
        return all(row["identity"].get(key, "null") == value for key, value in candidate["variant"]
                   if candidate["method"] == row["method"] or not key.startswith("method."))

    found = [candidate for candidate in candidates if agrees(candidate)]
    return found[0] if len(found) == 1 else None


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


def knob_of(method: str, key: str) -> Knob:
    """The knob ``key`` (a metrics.json ``knob``) of ``method`` as declared: ``TARGET``, or the knob the
    method's YAML declares (``declarations.py``); one no YAML declares (its method's is gone) is labelled
    by its key and has no off value."""
    if key == TARGET.key:
        return TARGET
    declaration = method_declaration(method)
    knob = None if declaration is None else method_knob(declaration)
    return knob if knob is not None and knob.key == key else Knob(key, None, key)


def _off(method: str, key: str | None) -> float | None:
    return None if key is None else knob_of(method, key).off_at


def format_knob(method: str, knob: str | None, value: float | None) -> str:
    """A run's knob as a label: "λ=0.1", "keep=0.5"; "baseline" for the un-pruned run."""
    if knob is None:
        return "baseline"
    return f"{knob_symbol(method, knob)}={format_lambda(value)}"


def knob_symbol(method: str, knob: str | None) -> str:
    """The knob's declared label (λ, keep, target); "—" for none."""
    if knob is None:
        return "—"
    return knob_of(method, knob).label


def format_flops(value: float | None) -> str:
    """1234567 -> '1.23 M'."""
    if value is None:
        return "—"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g}"


def format_variant(variant: tuple) -> str:
    """A variant as its column shows it: "method.score=cls_attention, train.epochs=3"; "" for none."""
    return ", ".join(f"{key}={value}" for key, value in variant)


def _pm(mean: float | None, std: float | None, fmt: str = "{:.3f}") -> str:
    if mean is None:
        return "—"
    return fmt.format(mean) + (f"±{fmt.format(std)}" if std is not None else "")


def _points(mean: float | None, std: float | None = None) -> str:
    """A score in points, as GLUE papers give it: 0.8515 ± 0.0057 -> "85.15±0.57"."""
    return _pm(None if mean is None else 100 * mean, None if std is None else 100 * std, "{:.2f}")


def _delta_points(delta: float | None) -> str:
    """A difference of scores in points: -0.0096 -> "-0.96"."""
    return "—" if delta is None else f"{100 * delta:+.2f}"


def _reduction(row: dict) -> str:
    return "—" if row["reduction"] is None else f"{row['reduction']:.2f}×"


def _percent(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{100 * mean:.1f}" + (f"±{100 * std:.1f}" if std is not None else "") + "%"


def _series(row: dict) -> str:
    """A method with its variant, as a column or legend names it: "gates (method.score=cls_attention)"."""
    return row["method"] + (f" ({format_variant(row['variant'])})" if row["variant"] else "")


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of one task's table (the same for the console and Markdown): its rows, with the
    trivial score's row after the baseline's."""
    metric = rows[0]["metric"]
    with_variant = any(row["variant"] for row in rows)
    with_train = any(row["train_flops_ratio_mean"] is not None for row in rows)
    with_cue = any(row["cue_kept_mean"] is not None for row in rows)
    with_agreement = any(row["agreement_mean"] is not None for row in rows)
    with_warned = any(row["warned"] for row in rows)
    header = (["method"] + (["variant"] if with_variant else []) + ["knob", "value", f"{metric} (hard)",
              "Δ vs baseline", "Δ vs knob off", "FLOPs/example", "FLOPs ratio"]
              + (["FLOPs ratio (train)"] if with_train else []) + ["reduction", "kept, last layer"]
              + (["cue kept"] if with_cue else []) + (["hard = soft"] if with_agreement else []) + ["runs"]
              + (["warned"] if with_warned else []))
    cells = []
    for row in rows:
        line = [row["method"]] + ([format_variant(row["variant"])] if with_variant else []) + [
            knob_symbol(row["method"], row["knob"]), format_lambda(row["knob_value"]),
            _points(row["score_mean"], row["score_std"]),
            "—" if row["baseline"] else _delta_points(row["delta_baseline"]), _delta_points(row["delta"]),
            format_flops(row["flops_per_example_mean"]), _pm(row["flops_ratio_mean"], row["flops_ratio_std"])]
        if with_train:
            line.append(_pm(row["train_flops_ratio_mean"], row["train_flops_ratio_std"]))
        line += [_reduction(row), _percent(row["kept_last_mean"], row["kept_last_std"])]
        if with_cue:
            line.append(_percent(row["cue_kept_mean"], row["cue_kept_std"]))
        if with_agreement:
            line.append(_percent(row["agreement_mean"], row["agreement_std"]))
        line.append(str(row["n"]))
        if with_warned:
            line.append(str(row["warned"]) if row["warned"] else "")
        cells.append(line)
    # The floor a score must clear to mean anything: no FLOPs, no seeds, no knob of its own.
    trivial = [TRIVIAL] + [""] * (len(header) - 1)
    trivial[header.index(f"{metric} (hard)")] = _points(rows[0]["trivial_score"])
    cells.insert(sum(row["baseline"] for row in rows), trivial)
    return header, cells


def _compare_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The methods side by side: per task, one line per knob value that at least two of the baseline and
    the methods (each variant its own) share, so a λ or keep sweep of a single method still shows
    beside its baseline. A method's cell: score (Δ vs baseline, points) @ dev FLOPs ratio, n seeds."""
    pruned = [row for row in rows if not row["baseline"]]
    series = list(dict.fromkeys(_series(row) for row in sorted(pruned, key=lambda row: (
        _method_rank(row["method"]), row["variant"]))))
    header = ["task", "knob", *series, "baseline", TRIVIAL]
    cells = []
    for task, task_rows in _by_task(rows).items():
        baselines = [row for row in task_rows if row["baseline"]]
        lines: dict[tuple, dict[str, dict]] = defaultdict(dict)
        for row in task_rows:
            if not row["baseline"]:
                lines[(_knob_rank(row["knob"]), row["knob_value"], row["knob"])][_series(row)] = row
        base = "; ".join(f"{_points(row['score_mean'], row['score_std'])} n={row['n']}"
                         + (f" ({format_variant(row['variant'])})" if row["variant"] else "") for row in baselines)
        for (_, value, knob), by_series in sorted(lines.items()):
            if len(by_series) + bool(baselines) < 2:
                continue
            method = next(iter(by_series.values()))["method"]  # methods sharing a knob key share its label
            cells.append([f"{task} ({task_rows[0]['metric']})", format_knob(method, knob, value)]
                         + [_compare_cell(by_series[name]) if name in by_series else "—" for name in series]
                         + [base or "—", _points(task_rows[0]["trivial_score"])])
    return header, cells


def _compare_cell(row: dict) -> str:
    delta = "" if row["delta_baseline"] is None else f" ({_delta_points(row['delta_baseline'])})"
    return f"{_points(row['score_mean'], row['score_std'])}{delta} @{row['flops_ratio_mean']:.3f} n={row['n']}"


def _best_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Per task, method and variant: the knob value with the largest FLOPs reduction whose mean score is
    within `WITHIN` (a point) of the baseline's mean; where none is, the closest try, so the line says
    how far off the method stays."""
    with_variant = any(row["variant"] for row in rows if not row["baseline"])
    header = (["task", "method"] + (["variant"] if with_variant else [])
              + ["knob", "score (hard)", "Δ vs baseline", "FLOPs ratio", "reduction", "seeds"])
    cells = []
    for task, task_rows in _by_task(rows).items():
        methods: dict[tuple, list[dict]] = defaultdict(list)
        for row in task_rows:
            if not row["baseline"]:
                methods[(_method_rank(row["method"]), row["variant"])].append(row)
        for (_, variant), method_rows in sorted(methods.items()):
            start = [f"{task} ({task_rows[0]['metric']})", method_rows[0]["method"]] + (
                [format_variant(variant)] if with_variant else [])
            compared = [row for row in method_rows if row["delta_baseline"] is not None]
            if not compared:
                cells.append(start + ["no baseline run to compare with"] + ["—"] * 5)
                continue
            # A hair of tolerance: a score exactly a point below the baseline's differs by 0.01 ± 1e-17.
            within = [row for row in compared if row["delta_baseline"] >= -WITHIN - 1e-9]
            if within:
                row = max(within, key=lambda row: (row["reduction"] or 0.0, row["score_mean"]))
                knob = format_knob(row["method"], row["knob"], row["knob_value"])
            else:
                row = max(compared, key=lambda row: (row["delta_baseline"], row["reduction"] or 0.0))
                knob = f"none within 1 point; closest: {format_knob(row['method'], row['knob'], row['knob_value'])}"
            cells.append(start + [knob, _points(row["score_mean"], row["score_std"]),
                                  _delta_points(row["delta_baseline"]),
                                  _pm(row["flops_ratio_mean"], row["flops_ratio_std"]), _reduction(row), str(row["n"])])
    return header, cells


def _by_task(rows: list[dict]) -> dict[str, list[dict]]:
    tasks: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        tasks[row["task"]].append(row)
    return dict(sorted(tasks.items()))


def _md_table(header: list[str], cells: list[list[str]]) -> list[str]:
    def md_line(line):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |"

    align = "|" + "|".join(":---" if name in _LEFT else "---:" for name in header) + "|"
    return [md_line(header), align] + [md_line(line) for line in cells]


def _task_tables(rows: list[dict], level: str) -> list[str]:
    """Every task's table under a `level` heading ("##", "###"): `<task> (<metric>)`."""
    lines = []
    for task, task_rows in _by_task(rows).items():
        lines += [f"{level} {task} ({task_rows[0]['metric']})", "", *_md_table(*_table(task_rows)), ""]
    return lines


def render_table(folder: Path, name: str, console=None) -> str:
    """One Markdown table of the runs under `folder`, without a trailing newline: `runs` (every task's
    table, as report.md has them), `compare` (`_compare_table`) or `best` (`_best_table`). What
    `dynbert report --table` prints, and what the results tables in README.md and docs/ must equal.

    Writes nothing; with a `console`, warns there of skipped files and duplicate runs.
    """
    check_table(name)
    runs, _ = _load_finished(folder, console)
    rows = summarize(runs)
    if name == "runs":
        return "\n".join(_task_tables(rows, "###")).rstrip("\n")
    return "\n".join(_md_table(*(_compare_table if name == "compare" else _best_table)(rows)))


def check_table(name: str) -> None:
    if name not in TABLES:
        raise DynbertError(f"Unknown table {name!r}: choose from {', '.join(TABLES)}.")


def _markdown(folder: Path, runs: list[dict], bad: list, rows: list[dict], figure: str | None) -> str:
    lines = ["# dynbert report", "",
             f"{len(runs)} finished runs from `{folder}`" + (f"; {len(bad)} unreadable metrics.json skipped." if bad else "."),
             "", FLOPS_NOTE,
             "Scores are in hard mode (pruned tokens physically removed) and in points (×100), as GLUE papers "
             "give them; ± is the sample standard deviation over seeds; Δ vs baseline is the difference, in "
             "points, to the task's un-pruned baseline; Δ vs knob off, to the same task and method's run with "
             "its knob off (λ = 0, keep = 1; the baseline row: the gates at λ = 0); the variant names the "
             "config keys in which runs of one method differ besides the knob and the seed; "
             f"'{TRIVIAL}' is the score of answering the dev set's most frequent class every time; FLOPs ratio "
             "(train) is the same ratio on the first 1,000 training examples, where a FLOPs target was held; "
             "hard = soft is the fraction of identical predictions with and without rounding.", ""]
    lines += _task_tables(rows, "##")
    if figure:
        lines += [f"![Score against relative FLOPs]({figure})", ""]
    warned = _run_warnings(folder, runs)
    if warned:
        lines += ["## Run warnings", ""] + [f"- `{run_dir}`: {warning}" for run_dir, warning in warned] + [""]
    if bad:
        lines += ["## Skipped files", ""] + [f"- `{path}`: {why}" for path, why in bad] + [""]
    return "\n".join(lines)


def _run_warnings(folder: Path, runs: list[dict]) -> list[tuple[str, str]]:
    """(run folder relative to `folder`, warning) for every warning of every run, in folder order."""
    return [(_relative(run["run_dir"], folder), warning)
            for run in sorted(runs, key=lambda run: str(run["run_dir"])) for warning in run.get("warnings") or []]


def _relative(run_dir: Path, folder: Path) -> str:
    try:
        return run_dir.relative_to(folder).as_posix()
    except ValueError:
        return str(run_dir)


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
    """One line per run: every metrics.json key flattened, and its variant where some run has one."""
    with_variant = any(run["variant"] for run in runs)
    flat_runs = []
    def order(run: dict) -> tuple:
        task, baseline, method, variant, knob, value = _group_key(run)
        row = {"task": task, "baseline": baseline, "method": method, "variant": variant, "knob": knob,
               "knob_value": value}
        return (*_row_order(row), run["seed"], str(run["run_dir"]))

    for run in sorted(runs, key=order):
        flat: dict = {}
        _flatten({k: v for k, v in run.items() if k not in ("run_dir", "identity", "variant")}, "", flat)
        flat["run_dir"] = _relative(run["run_dir"], folder)
        if with_variant:
            flat["variant"] = format_variant(run["variant"])
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
    return f"{metric}, hard mode (points: ×100)"


_METHOD_COLORS = {"gates": "tab:blue", "power_bert": "tab:orange", "ltp": "tab:green", "topk": "tab:purple",
                  "random": "tab:gray"}
_OTHER_COLORS = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan")
_VARIANT_MARKERS = ("o", "s", "^", "D", "v", "P")
"""A method's variants share its colour and differ in marker, in the order the rows list them."""


def _method_color(method: str) -> str:
    """The same colour for a method in every panel and every report (red is the baseline's)."""
    if method in _METHOD_COLORS:
        return _METHOD_COLORS[method]
    return _OTHER_COLORS[int(hashlib.sha1(method.encode()).hexdigest(), 16) % len(_OTHER_COLORS)]


def plot_tradeoff(rows: list[dict]):
    """One panel per task: score (hard mode, in points) against relative FLOPs, one colour per method (a
    marker per variant), each with its own Pareto front, knob labels (λ=0.1, keep=0.5), the baseline star.

    Returns a matplotlib Figure drawn on the Agg canvas (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
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
        # In points, as the tables show them.
        drawable = [{**r, "score_mean": 100 * r["score_mean"],
                     "score_std": None if r["score_std"] is None else 100 * r["score_std"]}
                    for r in task_rows if r["score_mean"] is not None and r["flops_ratio_mean"] is not None
                    and math.isfinite(r["score_mean"]) and math.isfinite(r["flops_ratio_mean"])]
        pruned = [r for r in drawable if not r["baseline"]]
        base = [r for r in drawable if r["baseline"]]
        methods: dict[str, list[dict]] = defaultdict(list)
        for r in pruned:  # rows come sorted: methods in METHOD_ORDER, then variants, knob values ascending
            methods[_series(r)].append(r)
        variants = defaultdict(list)
        for method_rows in methods.values():
            variants[method_rows[0]["method"]].append(method_rows[0]["variant"])
        ax.axvline(1.0, color="0.8", lw=0.8, zorder=0)
        for r in base:
            ax.axhline(r["score_mean"], color="tab:red", lw=0.8, ls=":", alpha=0.7, zorder=0)
        handles = []
        for series, method_rows in methods.items():
            method, variant = method_rows[0]["method"], method_rows[0]["variant"]
            color = _method_color(method)
            marker = _VARIANT_MARKERS[variants[method].index(variant) % len(_VARIANT_MARKERS)]
            # Gates swept over λ and held to FLOPs targets in one folder: both knobs label its points.
            knobs = ", ".join(dict.fromkeys(knob_symbol(method, r["knob"]) for r in method_rows))
            mx = [r["flops_ratio_mean"] for r in method_rows]
            my = [r["score_mean"] for r in method_rows]
            front = pareto_front(list(zip(mx, my)))
            ax.step([mx[i] for i in front], [my[i] for i in front], where="post", color=color, lw=1.2,
                    ls="--", alpha=0.8, label=f"Pareto front ({series})", zorder=1)
            for r, x, y in zip(method_rows, mx, my):
                if r["score_std"] is not None or r["flops_ratio_std"] is not None:
                    ax.errorbar(x, y, xerr=r["flops_ratio_std"], yerr=r["score_std"], fmt="none",
                                ecolor=color, elinewidth=0.8, capsize=2, alpha=0.7, zorder=2)
            handles.append(ax.scatter(mx, my, s=28, color=color, marker=marker, edgecolor="white", linewidth=0.5,
                                      zorder=3, label=f"{series} (label: {knobs})"))
        if methods:
            handles.append(Line2D([], [], color="0.4", lw=1.2, ls="--",
                                  label="Pareto front" if len(methods) == 1 else "each method's Pareto front"))
        for r in base:
            if r["score_std"] is not None or r["flops_ratio_std"] is not None:
                ax.errorbar(r["flops_ratio_mean"], r["score_mean"], xerr=r["flops_ratio_std"], yerr=r["score_std"],
                            fmt="none", ecolor="tab:red", elinewidth=0.8, capsize=2, zorder=2)
            handles.append(ax.scatter([r["flops_ratio_mean"]], [r["score_mean"]], marker="*", s=160, color="tab:red",
                                      edgecolor="black", linewidth=0.5, zorder=4, label="un-gated baseline"
                                      + (f" ({format_variant(r['variant'])})" if r["variant"] else "")))
        xs = [r["flops_ratio_mean"] for r in pruned]
        ys = [r["score_mean"] for r in pruned]
        all_x = xs + [r["flops_ratio_mean"] for r in base]
        x_err = [r["flops_ratio_std"] or 0.0 for r in pruned + base]
        ax.set_xlim(0.0, max([1.05] + [x + e + 0.03 for x, e in zip(all_x, x_err)]))
        ax.margins(y=0.18)
        metric = task_rows[0]["metric"]
        ax.set_xlabel("relative FLOPs per example (× un-gated; 1.0 = no pruning)")
        ax.set_ylabel(_y_label(metric))
        ax.set_title(f"{task} — {metric} (hard mode)")
        ax.grid(True, color="0.92", lw=0.6)
        ax.set_axisbelow(True)
        # "best": a fixed corner hid STS-B's one pruned point (84.1 at 0.85) under the legend.
        legend = ax.legend(handles=handles, loc="best", fontsize=7, framealpha=0.9) if handles else None
        items = [(x, y, format_knob(r["method"], r["knob"], r["knob_value"])) for r, x, y in zip(pruned, xs, ys)]
        items = [(r["flops_ratio_mean"], r["score_mean"], "baseline") for r in base] + items
        # What labels must not cover, in data units with a pad in points: markers (the star is larger than
        # a dot) and error bars with their caps.
        shapes = [(x, y, x, y, 4.0) for x, y in zip(xs, ys)]
        shapes += [(r["flops_ratio_mean"], r["score_mean"], r["flops_ratio_mean"], r["score_mean"], 7.5) for r in base]
        for r in pruned + base:
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
    if not wanted:  # a report of nothing would exit 0 having written nothing
        raise DynbertError(f"No report format given: pass one or more of {', '.join(FORMATS)}, e.g. --format md,csv.")
    return wanted


def _print_tables(console, rows: list[dict]) -> None:
    from rich.table import Table

    for task, task_rows in _by_task(rows).items():
        header, cells = _table(task_rows)
        table = Table(title=f"{task}: {task_rows[0]['metric']} (hard mode, points)", title_justify="left")
        for name in header:
            table.add_column(name, justify="left" if name in _LEFT else "right")
        for line in cells:
            table.add_row(*line)
        print_table(console, table)
    console.print(FLOPS_NOTE, style="dim", markup=False, highlight=False)


def _load_finished(folder: Path, console) -> tuple[list[dict], list[tuple[Path, str]]]:
    """`load_runs`, or one sentence when no run under `folder` can be reported; with a `console`, a warning
    there per unreadable metrics.json and per run that repeats another's identity and seed (both are
    averaged into one row: most likely a run copied in twice)."""
    from rich.markup import escape

    folder = Path(folder)
    runs, bad = load_runs(folder)
    if not runs:
        if bad:
            listed = "; ".join(f"{path} ({why})" for path, why in bad)
            raise DynbertError(f"No usable run under {folder}: every metrics.json is bad: {listed}.")
        raise DynbertError(f"No finished run under {folder}: no metrics.json found (unfinished runs have none).")
    if console is None:
        return runs, bad
    for path, why in bad:
        console.print(f"[yellow]warning:[/] skipped {escape(str(path))}: {escape(why)}", highlight=False, soft_wrap=True)
    seen: dict[tuple, list[Path]] = defaultdict(list)
    for run in runs:
        seen[(*_group_key(run), run["seed"])].append(run["run_dir"])
    for (task, _, method, variant, knob, value, seed), dirs in seen.items():
        if len(dirs) > 1:
            same = f", {format_variant(variant)}" if variant else ""
            console.print(f"[yellow]warning:[/] {len(dirs)} runs share task {escape(task)}, method {escape(method)}"
                          f"{escape(same)}, {escape(format_knob(method, knob, value))}, seed {seed}; all are averaged: "
                          + escape(", ".join(map(str, dirs))), highlight=False)
    return runs, bad


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
    runs, bad = _load_finished(folder, console)
    rows = summarize(runs)
    _print_tables(console, rows)
    for run_dir, warning in _run_warnings(folder, runs):
        console.print(f"[yellow]warning:[/] {escape(run_dir)}: {escape(warning)}", highlight=False, soft_wrap=True)

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
