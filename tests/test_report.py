"""dynbert.report: loading finished runs, averaging seeds, the Pareto front, and the written report."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import xml.etree.ElementTree as ET
from itertools import combinations
from pathlib import Path

import matplotlib.image
import pytest
from rich.console import Console

from dynbert.errors import DynbertError
from dynbert.report import (latest_sweep, load_runs, pareto_front, plot_tradeoff, render_table, summarize,
                            write_report)
from helpers import invoke


def write_run(root: Path, rel: str, **fields) -> Path:
    """A finished run folder `root/rel` whose metrics.json holds every required key (fields override)."""
    score = fields.get("score", 0.9)
    metrics = {
        "task": "sst2", "lambda": 0.0, "seed": 0, "baseline": False, "metric": "accuracy",
        "score": score, "score_soft": score - 0.01, "metrics": {"accuracy": score, "loss": 0.25},
        "flops_per_example": 2.0e9, "baseline_flops_per_example": 2.0e9, "flops_ratio": 1.0,
        "kept_per_layer": [1.0, 1.0, 1.0], "train_seconds": 3.5, "version": "0.1.0",
    }
    metrics.update(fields)
    folder = root / rel
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def make_sweep(root: Path) -> None:
    """Two tasks, several λ, 1-3 seeds, and an sst2 baseline, at the depth a sweep writes them."""
    for seed, score in enumerate([0.90, 0.92, 0.94]):
        write_run(root, f"sst2/gates-lambda0-seed{seed}", seed=seed, score=score)
    for seed, (score, ratio, kept, agree) in enumerate([(0.85, 0.5, [1.0, 0.5, 0.2], 0.98),
                                                         (0.89, 0.3, [1.0, 0.4, 0.1], 1.0)]):
        write_run(root, f"sst2/gates-lambda0.1-seed{seed}", seed=seed, score=score, flops_ratio=ratio,
                  flops_per_example=ratio * 2.0e9, kept_per_layer=kept, hard_soft_agreement=agree,
                  **{"lambda": 0.1})
    # The baseline's λ is meaningless: different values must still land in one row.
    write_run(root, "sst2/none-lambda0-seed0", baseline=True, seed=0, score=0.93)
    write_run(root, "sst2/none-lambda0.5-seed1", baseline=True, seed=1, score=0.95, **{"lambda": 0.5})
    # synthetic: no λ=0 run; cue_kept present in one run, null in one, absent in one.
    for seed, (score, cue) in enumerate([(1.0, 0.8), (0.9, None), (0.8, "absent")]):
        extra = {} if cue == "absent" else {"cue_kept": cue}
        write_run(root, f"synthetic/gates-lambda0.2-seed{seed}", task="synthetic", seed=seed, score=score,
                  flops_ratio=0.25, flops_per_example=5.0e5, baseline_flops_per_example=2.0e6,
                  kept_per_layer=[1.0, 0.3], **{"lambda": 0.2}, **extra)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=1000)


def row_for(rows, task, lam, baseline=False):
    (row,) = [r for r in rows if r["task"] == task and r["lambda"] == lam and r["baseline"] == baseline]
    return row


def test_summarize_averages_seeds_by_hand(tmp_path):
    make_sweep(tmp_path)
    runs, bad = load_runs(tmp_path)
    assert bad == [] and len(runs) == 10
    rows = summarize(runs)
    assert [(r["task"], r["baseline"], r["lambda"]) for r in rows] == [
        ("sst2", True, None), ("sst2", False, 0.0), ("sst2", False, 0.1), ("synthetic", False, 0.2)]

    zero = row_for(rows, "sst2", 0.0)
    # 0.90, 0.92, 0.94: mean 0.92; squared deviations 0.0004 + 0 + 0.0004 over n-1 = 2 -> std 0.02.
    assert zero["n"] == 3 and zero["seeds"] == [0, 1, 2]
    assert zero["score_mean"] == pytest.approx(0.92) and zero["score_std"] == pytest.approx(0.02)
    assert zero["flops_ratio_std"] == pytest.approx(0.0) and zero["delta"] == pytest.approx(0.0)
    assert zero["reduction"] == pytest.approx(1.0)

    lam = row_for(rows, "sst2", 0.1)
    # 0.85, 0.89: mean 0.87; std sqrt((0.02² + 0.02²) / 1) = 0.0283; ratios 0.5, 0.3 -> 0.4 ± 0.1414.
    assert lam["score_mean"] == pytest.approx(0.87) and lam["score_std"] == pytest.approx(0.028284, abs=1e-6)
    assert lam["flops_ratio_mean"] == pytest.approx(0.4) and lam["flops_ratio_std"] == pytest.approx(0.141421, abs=1e-6)
    assert lam["reduction"] == pytest.approx(2.5)  # 1 / 0.4
    assert lam["flops_per_example_mean"] == pytest.approx(0.8e9)
    assert lam["kept_last_mean"] == pytest.approx(0.15)  # last layer: 0.2 and 0.1
    assert lam["delta"] == pytest.approx(0.87 - 0.92)
    assert lam["delta_baseline"] == pytest.approx(0.87 - 0.94)  # "within a point" is from the un-pruned model
    assert lam["cue_kept_mean"] is None
    assert lam["agreement_mean"] == pytest.approx(0.99) and zero["agreement_mean"] is None

    base = row_for(rows, "sst2", None, baseline=True)
    assert base["n"] == 2 and base["score_mean"] == pytest.approx(0.94)
    assert base["delta"] == pytest.approx(0.02)  # baseline compared with the gated λ=0 mean as well

    syn = row_for(rows, "synthetic", 0.2)
    # 1.0, 0.9, 0.8: mean 0.9, std 0.1; no λ=0 run -> no delta; cue_kept only from the one run that has it.
    assert syn["score_mean"] == pytest.approx(0.9) and syn["score_std"] == pytest.approx(0.1)
    assert syn["delta"] is None and syn["reduction"] == pytest.approx(4.0)
    assert syn["delta_baseline"] is None  # synthetic has no baseline run here
    assert syn["cue_kept_mean"] == pytest.approx(0.8) and syn["cue_kept_std"] is None
    assert syn["kept_last_mean"] == pytest.approx(0.3) and syn["kept_last_std"] == pytest.approx(0.0)


def test_single_seed_has_no_std(tmp_path):
    write_run(tmp_path, "a", score=0.7)
    (row,) = summarize(load_runs(tmp_path)[0])
    assert row["score_mean"] == pytest.approx(0.7) and row["score_std"] is None


def test_pareto_front_ties_and_dominated_points():
    points = [
        (0.5, 0.8),   # 0: dominated by 1 (less FLOPs, same score)
        (0.3, 0.8),   # 1: front
        (0.3, 0.7),   # 2: dominated by 1 (same FLOPs, lower score)
        (0.6, 0.9),   # 3: front
        (0.6, 0.9),   # 4: identical to 3: neither dominates the other, both stay
        (1.0, 0.85),  # 5: dominated by 3
        (0.1, 0.5),   # 6: front (cheapest)
        (0.2, 0.5),   # 7: dominated by 6
        (math.nan, 0.99),  # 8: not a point
    ]
    assert pareto_front(points) == [6, 1, 3, 4]
    assert pareto_front([]) == []
    assert pareto_front([(0.4, 0.6)]) == [0]


def test_write_report_files(tmp_path):
    sweep, out = tmp_path / "sweep", tmp_path / "report"
    make_sweep(sweep)
    (sweep / "sst2" / "gates-lambda0.3-seed0").mkdir()  # unfinished: no metrics.json, no warning
    console = quiet()
    paths = write_report(sweep, out=out, console=console)
    assert paths == [out / "report.md", out / "results.csv", out / "tradeoff.png", out / "tradeoff.svg"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temp files left
    assert "warning" not in console.file.getvalue()

    with open(out / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 10  # one row per run, not per λ
    assert {"metrics.accuracy", "metrics.loss", "kept_per_layer.0", "kept_per_layer.2", "cue_kept"} <= set(table[0])
    (run,) = [r for r in table if r["run_dir"] == "sst2/gates-lambda0.1-seed1"]
    assert float(run["score"]) == pytest.approx(0.89) and float(run["kept_per_layer.2"]) == pytest.approx(0.1)
    assert run["lambda"] == "0.1" and run["cue_kept"] == ""
    (syn,) = [r for r in table if r["run_dir"] == "synthetic/gates-lambda0.2-seed0"]
    assert syn["kept_per_layer.2"] == "" and float(syn["cue_kept"]) == pytest.approx(0.8)

    md = (out / "report.md").read_text()
    # Scores and their differences in points (×100); FLOPs ratios stay ratios.
    for text in ["## sst2", "## synthetic", "| baseline |", "| 0 |", "| 0.1 |", "| 0.2 |", "| 92.00±2.00 |",
                 "| -5.00 |", "| -7.00 |", "| 0.400±0.141 |", "2.50×", "real", "un-gated", "cue kept", "hard = soft",
                 "99.0±1.4%", "points (×100)"]:
        assert text in md, text

    png = (out / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out / "tradeoff.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 2 * image.shape[0]  # two panels side by side
    root = ET.parse(out / "tradeoff.svg").getroot()
    assert root.tag.endswith("svg")

    # The console shows the same tables.
    printed = console.file.getvalue()
    assert "sst2" in printed and "synthetic" in printed and "baseline" in printed


def test_a_run_that_warned_is_counted_in_its_row_and_its_warning_shown(tmp_path):
    """A collapsed run's score sits in a table like any other: its row must say a run warned, and why."""
    collapse = "100% of the dev predictions are 'negative', and always answering it scores 0.5000"
    write_run(tmp_path, "sst2/gates-lambda0.1-seed0", score=0.5, flops_ratio=0.1, warnings=[collapse], **{"lambda": 0.1})
    write_run(tmp_path, "sst2/gates-lambda0.1-seed1", seed=1, score=0.9, flops_ratio=0.5, warnings=[], **{"lambda": 0.1})
    write_run(tmp_path, "sst2/gates-lambda0-seed0", score=0.9)  # written before runs had warnings
    rows = summarize(load_runs(tmp_path)[0])
    assert [row["warned"] for row in rows] == [0, 1]
    console = quiet()
    write_report(tmp_path, formats=("md",), console=console)
    md = (tmp_path / "report.md").read_text()
    assert "| runs | warned |" in md and "| 2 | 1 |" in md
    assert f"## Run warnings\n\n- `sst2/gates-lambda0.1-seed0`: {collapse}" in md
    assert f"warning: sst2/gates-lambda0.1-seed0: {collapse}" in " ".join(console.file.getvalue().split())


def test_only_requested_formats_and_default_out(tmp_path):
    make_sweep(tmp_path)
    paths = write_report(tmp_path, formats=("csv",), console=quiet())
    assert paths == [tmp_path / "results.csv"]
    assert not (tmp_path / "tradeoff.png").exists() and not (tmp_path / "report.md").exists()


def test_unknown_format(tmp_path):
    make_sweep(tmp_path)
    with pytest.raises(DynbertError, match="pdf") as err:
        write_report(tmp_path, formats=("md", "pdf"), console=quiet())
    assert "png" in str(err.value) and "svg" in str(err.value)
    assert not (tmp_path / "report.md").exists()  # nothing written before the check


def test_bad_metrics_files_are_named_and_skipped(tmp_path):
    make_sweep(tmp_path)
    corrupt = tmp_path / "sst2/corrupt/metrics.json"
    corrupt.parent.mkdir()
    corrupt.write_text('{"task": "sst2", "score": ')  # a run killed mid-write by hand
    as_list = tmp_path / "deep/er/listed/metrics.json"
    as_list.parent.mkdir(parents=True)
    as_list.write_text("[1, 2]")
    partial = write_run(tmp_path, "sst2/partial") / "metrics.json"
    data = json.loads(partial.read_text())
    del data["score"], data["flops_ratio"]
    partial.write_text(json.dumps(data))
    (tmp_path / "sst2/unfinished").mkdir()

    runs, bad = load_runs(tmp_path)
    assert len(runs) == 10
    reasons = dict(bad)
    assert set(reasons) == {corrupt, as_list, partial}
    assert "JSON" in reasons[corrupt]
    assert "list" in reasons[as_list]
    assert "score" in reasons[partial] and "flops_ratio" in reasons[partial]

    console = quiet()
    paths = write_report(tmp_path, out=tmp_path / "out", formats=("md", "csv"), console=console)
    warnings = [line for line in console.file.getvalue().splitlines() if "warning" in line]
    assert len(warnings) == 3
    for path in (corrupt, as_list, partial):
        assert any(str(path) in line for line in warnings), path
    with open(paths[1], newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 10  # the good runs are still reported


def test_wrong_types_are_bad(tmp_path):
    write_run(tmp_path, "a", flops_ratio="0.9")
    write_run(tmp_path, "b", seed=True)
    write_run(tmp_path, "c", cue_kept="high")
    runs, bad = load_runs(tmp_path)
    assert runs == [] and [p.parent.name for p, _ in bad] == ["a", "b", "c"]


@pytest.mark.parametrize("fields, why", [
    ({"score": math.nan}, "holds NaN"),
    ({"flops_ratio": -0.5}, "'flops_ratio' is -0.5, expected a number > 0"),
    ({"flops_ratio": math.inf}, "holds Infinity"),
    ({"lambda": -1.0}, "'lambda' is -1.0, expected a number >= 0"),
    ({"kept_per_layer": [1.0, 1.5]}, "fractions in [0, 1]"),
    # Finite, but no metric: two seeds of 1e308 were averaged into "±inf".
    ({"score": 1e308}, "'score' is 1e+308, expected a metric in [-1, 1]"),
    ({"score_soft": -2.0}, "'score_soft' is -2.0, expected a metric in [-1, 1]"),
    ({"flops_ratio": 1.5}, "'flops_ratio' is 1.5, expected at most 1"),
    ({"flops_per_example": 1e300, "baseline_flops_per_example": 1e300}, "expected a FLOPs count below 1e+18"),
    ({"hard_soft_agreement": 5}, "'hard_soft_agreement' is 5, expected a fraction in [0, 1] or null"),
])
def test_values_no_healthy_run_writes_are_named_and_skipped(tmp_path, fields, why):
    """Such a file would show as nan±nan or 0.00× in the table: it is corrupt, not a result."""
    write_run(tmp_path, "sst2/good")
    bad_file = write_run(tmp_path, "sst2/bad", **fields) / "metrics.json"
    console = quiet()
    write_report(tmp_path, out=tmp_path / "out", formats=("csv",), console=console)
    runs, bad = load_runs(tmp_path)
    assert [run["run_dir"].name for run in runs] == ["good"]
    assert len(bad) == 1 and bad[0][0] == bad_file and why in bad[0][1]
    assert str(bad_file) in console.file.getvalue()
    assert "nan" not in (tmp_path / "out" / "results.csv").read_text().lower()


def test_a_report_of_no_format_or_into_a_file_name_is_refused_before_writing(tmp_path):
    """--format '' wrote nothing and exited 0; --out new.md made a folder named new.md."""
    make_sweep(tmp_path)
    with pytest.raises(DynbertError, match="No report format given: pass one or more of md, csv, png, svg"):
        write_report(tmp_path, out=tmp_path / "out", formats=(), console=quiet())
    with pytest.raises(DynbertError, match=r"--out .*new.md names a file \(.md\), but --out is the folder to write into"):
        write_report(tmp_path, out=tmp_path / "new.md", formats=("md",), console=quiet())
    assert not (tmp_path / "out").exists() and not (tmp_path / "new.md").exists()


def test_no_runs(tmp_path):
    with pytest.raises(DynbertError, match="No finished run") as err:
        write_report(tmp_path, console=quiet())
    assert str(tmp_path) in str(err.value)
    broken = tmp_path / "x/metrics.json"
    broken.parent.mkdir()
    broken.write_text("not json")
    with pytest.raises(DynbertError) as err:
        write_report(tmp_path, console=quiet())
    assert str(tmp_path) in str(err.value) and str(broken) in str(err.value)
    with pytest.raises(DynbertError):
        load_runs(tmp_path / "missing")


def test_latest_sweep(tmp_path):
    with pytest.raises(DynbertError, match="dynbert sweep"):
        latest_sweep(tmp_path)  # no outputs/sweeps at all
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    with pytest.raises(DynbertError, match="dynbert sweep"):
        latest_sweep(tmp_path)  # present but empty
    for name, mtime in [("2024-01-03", 1_000), ("2024-01-01", 3_000), ("2024-01-02", 2_000)]:
        (sweeps / name).mkdir()
        os.utime(sweeps / name, (mtime, mtime))
    (sweeps / "notes.txt").write_text("a file, even the newest, is not a sweep")
    assert latest_sweep(tmp_path) == sweeps / "2024-01-01"  # by modification time, not by name


def test_figure_labels_do_not_collide(tmp_path):
    # Three gated λ crowded into one spot, plus a baseline star next to them, plus a second task.
    for seed in (0, 1):
        for lam, ratio, score in [(0.01, 0.95, 0.900), (0.02, 0.952, 0.901), (0.03, 0.954, 0.899), (0.5, 0.3, 0.7)]:
            write_run(tmp_path, f"t/l{lam}-s{seed}", seed=seed, score=score + 0.002 * seed, flops_ratio=ratio + 0.001 * seed,
                      **{"lambda": lam})
        write_run(tmp_path, f"t/base-s{seed}", baseline=True, seed=seed, score=0.905)
    write_run(tmp_path, "u/l0", task="u", metric="pearson", score=0.8)
    write_run(tmp_path, "u/l1", task="u", metric="pearson", score=0.6, flops_ratio=0.4, **{"lambda": 1.0})
    fig = plot_tradeoff(summarize(load_runs(tmp_path)[0]))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax_t, ax_u = [ax for ax in fig.axes if ax.get_visible()]

    from matplotlib.text import Annotation, Text
    labels = {a.get_text(): a for a in ax_t.texts if isinstance(a, Annotation)}
    assert set(labels) == {"λ=0.01", "λ=0.02", "λ=0.03", "λ=0.5", "baseline"}
    boxes = {text: Text.get_window_extent(a, renderer) for text, a in labels.items()}
    for (name_a, a), (name_b, b) in combinations(boxes.items(), 2):
        assert not a.overlaps(b), (name_a, name_b)

    # Panel furniture: axis range, units, title with task and metric, error bars only where seeds > 1.
    assert ax_t.get_xlim()[0] == 0.0 and ax_t.get_xlim()[1] >= 1.05
    assert "FLOPs" in ax_t.get_xlabel() and "accuracy" in ax_t.get_ylabel() and "points" in ax_t.get_ylabel()
    assert "t" in ax_t.get_title() and "accuracy" in ax_t.get_title() and "pearson" in ax_u.get_title()
    assert len(ax_t.containers) == 5 and len(ax_u.containers) == 0
    assert "un-gated baseline" in [t.get_text() for t in ax_t.get_legend().get_texts()]
    # The front skips the dominated λ=0.03 (more FLOPs and a lower score than λ=0.01).
    (front,) = [line for line in ax_t.get_lines() if line.get_label().startswith("Pareto")]
    assert list(front.get_xdata()) == pytest.approx([0.3005, 0.9505, 0.9525])
    assert list(front.get_ydata()) == pytest.approx([70.1, 90.1, 90.2])  # points, as the tables give them


def test_methods_side_by_side_each_with_its_own_rows_front_and_colour(tmp_path):
    # Older files (no method, no knob) are the paper's gates over λ; the peers name their knob.
    write_run(tmp_path, "sst2/gates-lambda0-seed0", score=0.92)
    write_run(tmp_path, "sst2/gates-lambda0.1-seed0", score=0.90, flops_ratio=0.5, **{"lambda": 0.1})
    write_run(tmp_path, "sst2/none-lambda0-seed0", baseline=True, method="none", knob=None, knob_value=None, score=0.93)
    for keep, score, ratio in [(1.0, 0.91, 1.0), (0.5, 0.85, 0.6)]:
        write_run(tmp_path, f"sst2/topk-keep{keep}-seed0", method="topk", knob="method.keep", knob_value=keep,
                  score=score, flops_ratio=ratio, **{"lambda": 0.1})
    write_run(tmp_path, "sst2/power_bert-lambda0.001-seed0", method="power_bert", knob="lambda", knob_value=0.001,
              score=0.89, flops_ratio=0.4, **{"lambda": 0.001})

    rows = summarize(load_runs(tmp_path)[0])
    assert [(r["method"], r["knob"], r["knob_value"]) for r in rows] == [
        ("none", None, None), ("gates", "lambda", 0.0), ("gates", "lambda", 0.1),
        ("power_bert", "lambda", 0.001), ("topk", "method.keep", 0.5), ("topk", "method.keep", 1.0)]
    delta = {(r["method"], r["knob_value"]): r["delta"] for r in rows}
    assert delta[("topk", 0.5)] == pytest.approx(0.85 - 0.91)  # from the method's own keep = 1
    assert delta[("gates", 0.1)] == pytest.approx(0.90 - 0.92)  # from its own λ = 0
    assert delta[("power_bert", 0.001)] is None  # no λ = 0 run of its own
    topk_half = next(r for r in rows if r["method"] == "topk" and r["knob_value"] == 0.5)
    assert topk_half["lambda"] is None, "a top-k run's λ means nothing"

    write_report(tmp_path, formats=("md", "csv"), console=quiet())
    with open(tmp_path / "results.csv", newline="") as handle:
        table = {row["run_dir"]: row for row in csv.DictReader(handle)}
    assert table["sst2/gates-lambda0.1-seed0"]["method"] == "gates" and table["sst2/gates-lambda0.1-seed0"]["knob"] == "lambda"
    assert table["sst2/topk-keep0.5-seed0"]["knob_value"] == "0.5"
    md = (tmp_path / "report.md").read_text()
    assert "| topk | keep | 0.5 |" in md and "| power_bert | λ | 0.001 |" in md

    fig = plot_tradeoff(rows)
    (ax,) = [ax for ax in fig.axes if ax.get_visible()]
    fronts = {line.get_label(): line.get_color() for line in ax.get_lines() if line.get_label().startswith("Pareto")}
    assert set(fronts) == {"Pareto front (gates)", "Pareto front (power_bert)", "Pareto front (topk)"}
    assert len(set(fronts.values())) == 3, "one colour per method"
    from matplotlib.text import Annotation
    labels = {a.get_text() for a in ax.texts if isinstance(a, Annotation)}
    assert labels == {"λ=0", "λ=0.1", "λ=0.001", "keep=0.5", "keep=1", "baseline"}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:3] == ["gates (label: λ)", "power_bert (label: λ)", "topk (label: keep)"]
    assert "un-gated baseline" in legend


def test_a_knob_without_its_value_is_a_bad_file(tmp_path):
    write_run(tmp_path, "a", method="topk", knob="method.keep", knob_value=None)
    write_run(tmp_path, "b", method=3)
    runs, bad = load_runs(tmp_path)
    assert runs == [] and "knob_value" in bad[0][1] and "'method'" in bad[1][1]


def test_a_table_printed_to_a_log_is_whole_not_cut_to_80_columns(tmp_path):
    make_sweep(tmp_path)
    console = Console(file=io.StringIO())  # not a terminal: a sweep's log, a pipe
    write_report(tmp_path, formats=("md",), console=console)
    printed = console.file.getvalue()
    assert "Δ vs baseline" in printed and "hard = soft" in printed and "…" not in printed


# ----------------------------------------------------------------------------- identity, points, --table

def write_config(folder: Path, method: str = "gates", seed: int = 0, lam: float = 0.0, **keys) -> Path:
    """config.yaml beside a run's metrics.json, shaped as `dynbert train` writes it: `keys` are dotted
    overrides (method.score=..., train.epochs=...) of a plain gates run."""
    from omegaconf import OmegaConf

    grid = {"gates": "lambda=0,0.1", "ltp": "lambda=0,0.1", "topk": "method.keep=0.5,1", "none": None}[method]
    cfg = OmegaConf.create({
        "model": {"name": "minilm", "lr": 5e-5}, "task": {"name": "sst2", "max_length": 64, "data_dir": None},
        "method": {"name": method, "knob": "lambda${lambda}", "grid": grid, "score": "attention_received",
                   "start": 0.3},
        "train": {"epochs": 8, "lr": "${model.lr}", "num_threads": 1, "device": "auto", "overwrite": False},
        "sweep": {"name": "study", "params": {"seed": "0,1"}}, "glue_dir": "../shared/data/glue",
        "lambda": lam, "seed": seed, "run_name": "${method.name}-${method.knob}-seed${seed}",
        "output_dir": f"outputs/sweeps/study/{folder.name}"})
    for key, value in keys.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    return folder


def test_runs_that_differ_in_a_config_key_are_separate_rows_with_their_variant(tmp_path):
    """`dynbert sweep method.score=attention_received,cls_attention` averaged both scores into one row."""
    for seed in (0, 1):
        for score_name, score in (("attention_received", 0.90), ("cls_attention", 0.80)):
            folder = write_run(tmp_path, f"sst2/gates-{score_name}-lambda0.1-seed{seed}", seed=seed, score=score + seed / 100,
                               flops_ratio=0.5, **{"lambda": 0.1})
            # Seeds, folders, threads, machines' data paths and the sweep's own keys are not identity.
            write_config(folder, seed=seed, lam=0.1, method__score=score_name, output_dir=str(folder),
                         train__num_threads=seed + 1, glue_dir=f"/data{seed}", task__data_dir=f"/d{seed}",
                         sweep__params__seed=str(seed))
        # The baseline's method.start comes from the experiment; method=none never reads it.
        base = write_run(tmp_path, f"sst2/none-lambda0-seed{seed}", seed=seed, baseline=True, method="none", knob=None,
                         knob_value=None, score=0.92)
        write_config(base, method="none", seed=seed, method__start=0.3 + seed / 10)
    # A top-k run's λ is not read: two values of it are one result.
    for seed, lam in ((0, 0.1), (1, 0.3)):
        topk = write_run(tmp_path, f"sst2/topk-keep0.5-seed{seed}", seed=seed, method="topk", knob="method.keep",
                         knob_value=0.5, score=0.85, flops_ratio=0.6, **{"lambda": lam})
        write_config(topk, method="topk", seed=seed, lam=lam, method__keep=0.5)
    rows = summarize(load_runs(tmp_path)[0])
    assert [(r["method"], r["variant"], r["n"]) for r in rows] == [
        ("none", (), 2),
        ("gates", (("method.score", "attention_received"),), 2),
        ("gates", (("method.score", "cls_attention"),), 2),
        ("topk", (), 2)]
    assert [round(r["score_mean"], 3) for r in rows] == [0.92, 0.905, 0.805, 0.85]
    assert rows[2]["delta_baseline"] == pytest.approx(0.805 - 0.92)  # the one baseline, for every variant

    console = quiet()
    write_report(tmp_path, formats=("md", "csv"), console=console)
    assert "warning" not in console.file.getvalue(), "distinct runs are no duplicates"
    md = (tmp_path / "report.md").read_text()
    assert "| method | variant | knob | value |" in md
    assert "| gates | method.score=cls_attention | λ | 0.1 | 80.50±0.71 |" in md
    assert "| topk |  | keep | 0.5 | 85.00±0.00 |" in md
    with open(tmp_path / "results.csv", newline="") as handle:
        variants = {row["run_dir"]: row["variant"] for row in csv.DictReader(handle)}
    assert variants["sst2/gates-cls_attention-lambda0.1-seed1"] == "method.score=cls_attention"
    assert variants["sst2/none-lambda0-seed0"] == ""
    # The figure: a variant has its own points and front, in its method's colour with a marker of its own.
    (ax,) = [ax for ax in plot_tradeoff(rows).axes if ax.get_visible()]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:3] == ["gates (method.score=attention_received) (label: λ)",
                          "gates (method.score=cls_attention) (label: λ)", "topk (label: keep)"]
    gates = [c for c in ax.collections if c.get_label().startswith("gates")]
    assert len({tuple(c.get_facecolor()[0]) for c in gates}) == 1 and len({c.get_paths()[0].vertices.tobytes() for c in gates}) == 2


def test_a_recipe_is_one_variant_on_every_task_even_where_it_ran_alone(tmp_path):
    """sst2 ran the gates with two layer sets, stsb with one: stsb's run is the same recipe as one of
    sst2's and must sit in its column of the compare table, not in a column of its own."""
    for task, layers in (("sst2", "[1,2]"), ("sst2", "[2]"), ("stsb", "[1,2]")):
        folder = write_run(tmp_path, f"{task}/gates-lambda0.1-seed0-{len(layers)}", task=task, flops_ratio=0.5,
                           **{"lambda": 0.1})
        write_config(folder, lam=0.1, task__name=task, method__layers=layers)
    runs, _ = load_runs(tmp_path)
    assert sorted((run["task"], run["variant"]) for run in runs) == [
        ("sst2", (("method.layers", "[1,2]"),)), ("sst2", (("method.layers", "[2]"),)),
        ("stsb", (("method.layers", "[1,2]"),))]
    header = render_table(tmp_path, "compare").splitlines()[0]
    assert header.count("gates (") == 2, header


def test_only_a_true_duplicate_warns_and_a_run_without_config_groups_by_its_knob(tmp_path):
    first = write_run(tmp_path, "a/gates-lambda0.1-seed0", score=0.9, **{"lambda": 0.1})
    again = write_run(tmp_path, "b/gates-lambda0.1-seed0", score=0.8, **{"lambda": 0.1})
    for folder in (first, again):
        write_config(folder, lam=0.1, output_dir=str(folder))
    older = write_run(tmp_path, "c/gates-lambda0.1-seed1", seed=1, score=0.7, **{"lambda": 0.1})  # no config.yaml
    write_config(write_run(tmp_path, "d/gates-lambda0.1-seed0", score=0.6, **{"lambda": 0.1}), lam=0.1,
                 train__epochs=3)
    runs, _ = load_runs(tmp_path)
    assert [run["variant"] for run in runs] == [(("train.epochs", "8"),), (("train.epochs", "8"),), (),
                                                (("train.epochs", "3"),)]
    assert [(r["variant"], r["n"]) for r in summarize(runs)] == [
        ((), 1), ((("train.epochs", "3"),), 1), ((("train.epochs", "8"),), 2)]
    console = quiet()
    write_report(tmp_path, formats=("csv",), console=console)
    warnings = [line for line in console.file.getvalue().splitlines() if "warning" in line]
    assert len(warnings) == 1 and "2 runs share task sst2, method gates, train.epochs=8, λ=0.1, seed 0" in warnings[0]
    assert str(older) not in warnings[0]


def make_target_study(root: Path) -> None:
    """sst2: a baseline (two seeds, one of which knows the trivial score), gates and LTP held to FLOPs
    targets (gates within a point of the baseline at two, LTP at none), top-k at keep 0.5; stsb: gates
    alone, no baseline."""
    def run(rel, seed, score, **fields):
        method = fields.get("method", "none")
        fields.setdefault("flops_ratio", 1.0)
        folder = write_run(root, rel, seed=seed, score=score, flops_per_example=fields["flops_ratio"] * 1e8,
                           baseline_flops_per_example=1e8, **fields)
        write_config(folder, method=method, seed=seed, lam=0.1, output_dir=str(folder),
                     **({"method.target": fields["knob_value"]} if fields.get("knob") == "method.target" else {}))

    base = dict(baseline=True, method="none", knob=None, knob_value=None)
    run("sst2/none-lambda0-seed0", 0, 0.90, trivial_score=0.5092, **base)
    run("sst2/none-lambda0-seed1", 1, 0.92, **base)  # older: written before trivial_score

    def target(method, value, **fields):
        return dict(method=method, knob="method.target", knob_value=value, target=value, multiplier=0.3, **fields)

    # 90.00, exactly a point below 91.00 (in floats, 0.010000000000000009): still "within 1 point".
    run("sst2/gates-target0.5-seed0", 0, 0.905, flops_ratio=0.52, train_flops_ratio=0.5, **target("gates", 0.5))
    run("sst2/gates-target0.5-seed1", 1, 0.895, flops_ratio=0.50, train_flops_ratio=0.5, **target("gates", 0.5))
    run("sst2/gates-target0.33-seed0", 0, 0.88, flops_ratio=0.35, train_flops_ratio=0.33, **target("gates", 0.33))
    run("sst2/gates-target0.7-seed0", 0, 0.915, flops_ratio=0.7, train_flops_ratio=0.7, **target("gates", 0.7))
    run("sst2/ltp-target0.5-seed0", 0, 0.85, flops_ratio=0.55, train_flops_ratio=0.49, **target("ltp", 0.5))
    run("sst2/ltp-target0.33-seed0", 0, 0.80, flops_ratio=0.4, train_flops_ratio=0.33, **target("ltp", 0.33))
    run("sst2/topk-keep0.5-seed0", 0, 0.87, method="topk", knob="method.keep", knob_value=0.5, flops_ratio=0.6)
    run("stsb/gates-target0.5-seed0", 0, 0.8812, task="stsb", metric="spearmanr", trivial_score=0.0,
        flops_ratio=0.5, **target("gates", 0.5))


def test_table_runs_is_report_md_without_its_prose_in_points_with_the_trivial_row_and_train_flops(tmp_path):
    make_target_study(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    text = render_table(tmp_path, "runs")
    assert sorted(tmp_path.rglob("*")) == before, "--table writes nothing"
    sst2 = text.split("### stsb")[0]
    assert text.startswith("### sst2 (accuracy)\n\n| method | knob | value | accuracy (hard) | Δ vs baseline | "
                           "Δ vs knob off | FLOPs/example | FLOPs ratio | FLOPs ratio (train) | reduction |")
    lines = sst2.splitlines()
    # Right after the baseline: the trivial score (from the one run that knows it), no FLOPs, no seeds.
    assert lines[4].startswith("| none | — | baseline | 91.00±1.41 | — | — |")
    assert lines[5] == "| always the most frequent class |  |  | 50.92 |" + "  |" * 8
    assert lines[6].startswith("| gates | target | 0.33 | 88.00 | -3.00 | — | 35 M | 0.350 | 0.330 | 2.86× |")
    assert lines[7].startswith("| gates | target | 0.5 | 90.00±0.71 | -1.00 | — | 51 M | 0.510±0.014 | 0.500±0.000 |")
    assert "### stsb (spearmanr)" in text and "| gates | target | 0.5 | 88.12 |" in text
    assert "| always the most frequent class |  |  | 0.00 |" in text.split("### stsb")[1]
    assert not text.endswith("\n")
    # report.md holds the same tables, one heading level up, with its prose around them.
    write_report(tmp_path, formats=("md",), console=quiet())
    assert text.replace("### ", "## ") in (tmp_path / "report.md").read_text()


def test_without_train_flops_or_trivial_scores_the_column_is_absent_and_the_trivial_score_a_dash(tmp_path):
    make_sweep(tmp_path)
    text = render_table(tmp_path, "runs")
    assert "FLOPs ratio (train)" not in text and "variant" not in text
    assert "| always the most frequent class |  |  | — |" in text


def test_table_compare_puts_methods_side_by_side_at_equal_knob_value(tmp_path):
    make_target_study(tmp_path)
    assert render_table(tmp_path, "compare") == "\n".join([
        "| task | knob | gates | ltp | topk | baseline | always the most frequent class |",
        "|:---|:---|---:|---:|---:|---:|---:|",
        "| sst2 (accuracy) | keep=0.5 | — | — | 87.00 (-4.00) @0.600 n=1 | 91.00±1.41 n=2 | 50.92 |",
        "| sst2 (accuracy) | target=0.33 | 88.00 (-3.00) @0.350 n=1 | 80.00 (-11.00) @0.400 n=1 | — "
        "| 91.00±1.41 n=2 | 50.92 |",
        "| sst2 (accuracy) | target=0.5 | 90.00±0.71 (-1.00) @0.510 n=2 | 85.00 (-6.00) @0.550 n=1 | — "
        "| 91.00±1.41 n=2 | 50.92 |",
        "| sst2 (accuracy) | target=0.7 | 91.50 (+0.50) @0.700 n=1 | — | — | 91.00±1.41 n=2 | 50.92 |",
        # stsb: one method, no baseline: nothing to compare.
    ])


def test_table_best_takes_the_largest_reduction_within_a_point_or_says_none_is(tmp_path):
    make_target_study(tmp_path)
    assert render_table(tmp_path, "best") == "\n".join([
        "| task | method | knob | score (hard) | Δ vs baseline | FLOPs ratio | reduction | seeds |",
        "|:---|:---|:---|---:|---:|---:|---:|---:|",
        "| sst2 (accuracy) | gates | target=0.5 | 90.00±0.71 | -1.00 | 0.510±0.014 | 1.96× | 2 |",
        "| sst2 (accuracy) | ltp | none within 1 point; closest: target=0.5 | 85.00 | -6.00 | 0.550 | 1.82× | 1 |",
        "| sst2 (accuracy) | topk | none within 1 point; closest: keep=0.5 | 87.00 | -4.00 | 0.600 | 1.67× | 1 |",
        "| stsb (spearmanr) | gates | no baseline run to compare with | — | — | — | — | — |",
    ])


def test_report_table_on_the_command_line_prints_one_block_and_refuses_mistakes_first(tmp_path):
    make_target_study(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    result = invoke("report", tmp_path, "--table", "best")
    assert result.exit_code == 0, result.output
    assert result.stdout == render_table(tmp_path, "best") + "\n"
    assert sorted(tmp_path.rglob("*")) == before
    for args, message in [(["--table", "pareto"], "Unknown table 'pareto': choose from runs, compare, best."),
                          (["--table", "runs", "--out", tmp_path / "out"], "drop --format and --out")]:
        result = invoke("report", tmp_path, *args)
        assert result.exit_code == 2 and message in " ".join(result.stderr.split()), result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("report", empty, "--table", "runs")
    assert result.exit_code == 2 and "No finished run under" in result.stderr and result.stdout == ""
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.md"))


def test_each_variant_is_compared_with_the_baseline_and_knob_off_run_of_its_own_config(tmp_path):
    """Three epochs against eight: a pruned run is measured from the baseline trained as long as it was."""
    for epochs, base, off, pruned in ((3, 0.80, 0.79, 0.78), (8, 0.90, 0.895, 0.89)):
        folder = write_run(tmp_path, f"e{epochs}/none", baseline=True, method="none", knob=None, knob_value=None,
                           score=base)
        write_config(folder, method="none", train__epochs=epochs)
        for lam, score in ((0.0, off), (0.1, pruned)):
            write_config(write_run(tmp_path, f"e{epochs}/gates-{lam}", score=score, **{"lambda": lam}), lam=lam,
                         train__epochs=epochs)
    rows = summarize(load_runs(tmp_path)[0])
    deltas = {(r["method"], r["variant"][0][1], r["knob_value"]): (r["delta_baseline"], r["delta"]) for r in rows}
    assert deltas[("gates", "3", 0.1)] == pytest.approx((0.78 - 0.80, 0.78 - 0.79))
    assert deltas[("gates", "8", 0.1)] == pytest.approx((0.89 - 0.90, 0.89 - 0.895))
    assert deltas[("none", "8", None)] == pytest.approx((0.0, 0.90 - 0.895))  # the baseline, from the gates at λ = 0


def test_a_knob_is_compared_only_between_runs_it_is_not_the_knob_of(tmp_path):
    """A λ sweep beside a FLOPs-target sweep of the same method: λ is the knob of the one, and still the
    bi-modal weight of the gates held to a target; top-k's keep is its knob, or fixed beside a target."""
    def run(rel, lam, method="gates", **fields):
        keys = {"method.target": fields["knob_value"]} if fields.get("knob") == "method.target" else {}
        if method == "topk":
            keys["method.keep"] = 0.5
        write_config(write_run(tmp_path, rel, method=method, **fields, **{"lambda": lam}), method=method, lam=lam,
                     **keys)

    run("gates-lambda0.1", 0.1)
    run("gates-lambda0.3", 0.3)
    for lam in (0.1, 0.3):
        run(f"gates-target0.5-lambda{lam}", lam, knob="method.target", knob_value=0.5)
    run("topk-keep0.5", 0.1, "topk", knob="method.keep", knob_value=0.5)
    run("topk-target0.5", 0.1, "topk", knob="method.target", knob_value=0.5)
    runs, _ = load_runs(tmp_path)
    assert {run["run_dir"].name: run["variant"] for run in runs} == {
        "gates-lambda0.1": (), "gates-lambda0.3": (),
        "gates-target0.5-lambda0.1": (("lambda", "0.1"),), "gates-target0.5-lambda0.3": (("lambda", "0.3"),),
        "topk-keep0.5": (), "topk-target0.5": ()}


def test_report_and_its_tables_load_no_torch(tmp_path):
    """Reading run folders needs no torch: seconds saved on every `dynbert report`."""
    import subprocess
    import sys

    make_target_study(tmp_path)
    code = ("import sys; from typer.testing import CliRunner; from dynbert.cli import app; "
            f"result = CliRunner().invoke(app, ['report', {str(tmp_path)!r}, '--table', 'runs']); "
            "assert result.exit_code == 0, result.output; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
