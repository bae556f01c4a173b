"""`dynbert sweep` and `dynbert report` through the CLI: runs, skips, reruns, failures, launchers."""

from __future__ import annotations

import csv
import json

import matplotlib.image

from helpers import FAST, SYNTHETIC, invoke, read_json, run_dynbert

SWEEP = ["sweep", *FAST, *SYNTHETIC]


def statuses(folder):
    return {path.parent.name: json.loads(path.read_text()) for path in folder.rglob("status.json")}


def summary(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("done "))


def test_sweep_runs_the_grid_and_baseline_then_resumes(tmp_path):
    folder = tmp_path / "sweep"
    args = [*SWEEP, "lambda=0,0.1,0.3", f"output_dir={folder}"]
    runs = {"gated-lambda0-seed0", "gated-lambda0.1-seed0", "gated-lambda0.3-seed0", "none-lambda0-seed0"}

    # First with the joblib launcher, two runs at a time; then Hydra's basic one. The launcher is
    # not part of a run's config: the second launcher finds the first one's runs complete.
    first = run_dynbert(*args, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [str(folder.resolve())]  # the folder alone: jobs log to stderr
    assert {path.parent.name for path in folder.glob("synthetic/*/metrics.json")} == runs
    assert {run: status["status"] for run, status in statuses(folder).items()} == dict.fromkeys(runs, "done")
    assert summary(first.stderr) == "done 4, skipped (already complete) 0, failed 0"
    baseline = read_json(folder / "synthetic" / "none-lambda0-seed0" / "metrics.json")
    assert baseline["baseline"] is True and baseline["flops_ratio"] == 1.0

    report = invoke("report", folder)
    assert report.exit_code == 0, report.output
    with open(folder / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((row["baseline"], float(row["lambda"])) for row in rows) == [
        ("False", 0.0), ("False", 0.1), ("False", 0.3), ("True", 0.0)]
    png = folder / "tradeoff.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).shape[0] > 100

    # Re-running skips every finished run.
    metrics_before = {path: path.read_bytes() for path in folder.rglob("metrics.json")}
    again = run_dynbert(*args)
    assert again.returncode == 0, again.stderr
    assert summary(again.stderr) == "done 0, skipped (already complete) 4, failed 0"
    assert {path: path.read_bytes() for path in folder.rglob("metrics.json")} == metrics_before

    # One run lost its metrics: only it runs again. An earlier one in the grid holds a corrupt
    # checkpoint: it fails, the next still runs, and the sweep exits non-zero.
    (folder / "synthetic" / "gated-lambda0.1-seed0" / "metrics.json").unlink()
    broken = folder / "synthetic" / "gated-lambda0-seed0"
    (broken / "metrics.json").unlink()
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    third = run_dynbert(*args)
    assert third.returncode == 1
    assert third.stdout.splitlines()[-1] == str(folder.resolve())
    assert summary(third.stderr) == "done 1, skipped (already complete) 2, failed 1"
    now = statuses(folder)
    assert now["gated-lambda0.1-seed0"]["status"] == "done"
    assert (folder / "synthetic" / "gated-lambda0.1-seed0" / "metrics.json").is_file()
    assert now["gated-lambda0-seed0"]["status"] == "failed"
    assert "checkpoint.pt is not a usable checkpoint" in now["gated-lambda0-seed0"]["error"]
    assert "Traceback" not in third.stderr


def test_submitit_local_launcher_runs_a_sweep(tmp_path):
    result = run_dynbert(*SWEEP, "hydra/launcher=submitit_local", "lambda=0,0.1", "sweep.baseline=false",
                         f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == str(tmp_path.resolve())
    assert summary(result.stderr) == "done 2, skipped (already complete) 0, failed 0"
    assert sorted(read_json(path)["lambda"] for path in tmp_path.glob("synthetic/*/metrics.json")) == [0.0, 0.1]


def test_a_bad_value_anywhere_in_the_grid_fails_before_any_run(tmp_path):
    result = invoke(*SWEEP, "lambda=0,0.1,-1", f"output_dir={tmp_path / 'sweep'}")
    assert result.exit_code == 2
    assert "lambda=-1" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "sweep").exists()
