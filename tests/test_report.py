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
from dynbert.report import latest_sweep, load_runs, pareto_front, plot_tradeoff, summarize, write_report


def write_run(root: Path, rel: str, **fields) -> Path:
    """A finished run folder `root/rel` whose metrics.json holds every required key (fields override)."""
    score = fields.get("score", 0.9)
    metrics = {
        "task": "sst2", "lambda": 0.0, "seed": 0, "baseline": False, "metric": "accuracy",
        "score": score, "score_soft": score + 0.01, "metrics": {"accuracy": score, "loss": 0.25},
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
    for text in ["## sst2", "## synthetic", "| baseline |", "| 0 |", "| 0.1 |", "| 0.2 |", "0.920±0.020",
                 "-0.050", "-0.070", "2.50×", "real", "un-gated", "cue kept", "hard = soft", "99.0±1.4%"]:
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
    assert "FLOPs" in ax_t.get_xlabel() and "accuracy" in ax_t.get_ylabel()
    assert "t" in ax_t.get_title() and "accuracy" in ax_t.get_title() and "pearson" in ax_u.get_title()
    assert len(ax_t.containers) == 5 and len(ax_u.containers) == 0
    assert "un-gated baseline" in [t.get_text() for t in ax_t.get_legend().get_texts()]
    # The front skips the dominated λ=0.03 (more FLOPs and a lower score than λ=0.01).
    (front,) = [line for line in ax_t.get_lines() if line.get_label().startswith("Pareto")]
    assert list(front.get_xdata()) == pytest.approx([0.3005, 0.9505, 0.9525])


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
