"""`dynbert sweep` and `dynbert report` through the CLI: runs, skips, reruns, failures, launchers."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import matplotlib.image
import pytest
import torch

from helpers import FAST, SYNTHETIC, dynbert_command, invoke, read_json, run_dynbert

SWEEP = ["sweep", *FAST, *SYNTHETIC]


def statuses(folder):
    return {path.parent.name: json.loads(path.read_text()) for path in folder.rglob("status.json")}


def summary(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("done "))


@pytest.mark.slow
def test_sweep_runs_the_grid_and_baseline_then_resumes(tmp_path):
    folder = tmp_path / "sweep"
    args = [*SWEEP, "lambda=0,0.1,0.3", f"output_dir={folder}"]
    runs = {"gates-lambda0-seed0", "gates-lambda0.1-seed0", "gates-lambda0.3-seed0", "none-lambda0-seed0"}

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
    (folder / "synthetic" / "gates-lambda0.1-seed0" / "metrics.json").unlink()
    broken = folder / "synthetic" / "gates-lambda0-seed0"
    (broken / "metrics.json").unlink()
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    third = run_dynbert(*args)
    assert third.returncode == 1
    assert third.stdout.splitlines()[-1] == str(folder.resolve())
    assert summary(third.stderr) == "done 1, skipped (already complete) 2, failed 1"
    now = statuses(folder)
    assert now["gates-lambda0.1-seed0"]["status"] == "done"
    assert (folder / "synthetic" / "gates-lambda0.1-seed0" / "metrics.json").is_file()
    assert now["gates-lambda0-seed0"]["status"] == "failed"
    assert "checkpoint.pt is not a usable checkpoint" in now["gates-lambda0-seed0"]["error"]
    assert "Traceback" not in third.stderr


@pytest.mark.slow
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


@pytest.mark.slow
def test_every_swept_key_gets_its_own_run_folder(tmp_path):
    """A key the run name does not hold (method.score) is appended; values that are paths are
    made folder-safe. Before, both jobs shared one folder and the second was 'already complete'."""
    result = run_dynbert(*SWEEP, "lambda=0.1", "sweep.baseline=false", "method.score=attention_received,cls_attention",
                         f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert summary(result.stderr) == "done 2, skipped (already complete) 0, failed 0"
    # The summary table names each run whole, also in a log (it was cut to 80 columns: 'gates-…').
    assert "gates-lambda0.1-seed0-method.score=cls_attention" in result.stderr
    folders = sorted(path.parent.name for path in tmp_path.glob("synthetic/*/metrics.json"))
    assert folders == ["gates-lambda0.1-seed0-method.score=attention_received",
                       "gates-lambda0.1-seed0-method.score=cls_attention"]
    assert {read_json(tmp_path / "synthetic" / name / "metrics.json")["score_name"] for name in folders} == {
        "attention_received", "cls_attention"}


def test_a_dry_run_lists_the_folder_every_job_will_write_and_trains_nothing(tmp_path):
    result = invoke(*SWEEP, "lambda=0.1,0.3", "method.score=attention_received,cls_attention",
                    f"output_dir={tmp_path}", "--dry-run")
    assert result.exit_code == 0, result.output
    *folders, sweep_dir = result.stdout.strip().splitlines()
    assert sweep_dir == str(tmp_path.resolve())
    assert sorted(Path(folder).relative_to(tmp_path).as_posix() for folder in folders) == [
        f"synthetic/gates-lambda{lam}-seed0-method.score={score}"
        for lam in ("0.1", "0.3") for score in ("attention_received", "cls_attention")] + [
        "synthetic/none-lambda0-seed0"]
    assert "5 runs" in result.stderr and not any(tmp_path.iterdir())


def test_two_jobs_that_would_share_a_folder_are_refused_before_any_run(tmp_path):
    """A run name that drops the swept λ would make the second job 'already complete'."""
    result = invoke(*SWEEP, "lambda=0.1,0.3", "run_name=mine", f"output_dir={tmp_path}")
    assert result.exit_code == 2, result.output
    assert "two runs of this sweep would share" in result.stderr and "lambda=0.3" in result.stderr
    assert not any(tmp_path.iterdir())


def test_run_folder_names_stay_folder_safe_and_distinct():
    from dynbert.config import compose_config
    from dynbert.sweep import run_folder

    cfg = compose_config(["task=rte", "lambda=0.1", "sweep.swept_keys=[lambda,model.name_or_path,train.lr]"])
    names = {run_folder(Path("/s"), cfg, [f"model.name_or_path={path}", "train.lr=1e-4", "lambda=0.1"]).name
             for path in ("/models/a/bert", "/models/b/bert", "models_a_bert")}
    assert len(names) == 3
    assert all("/" not in name and name.startswith("gates-lambda0.1-seed0-model.name_or_path=") for name in names)
    assert all(name.endswith("-train.lr=1e-4") for name in names)


@pytest.mark.slow
def test_sigterm_stops_every_job_of_the_sweep_each_checkpointed(tmp_path):
    """SLURM, `timeout` and `docker stop` send SIGTERM: no job may go on training in the background."""
    mark = f"dynbert-test-{uuid.uuid4().hex}"  # every process of this sweep inherits it
    # Runs that cannot finish on their own: the stop must come from the signal. Two run, the third
    # waits for a worker: it must never start.
    args = [*SWEEP, "lambda=0.1,0.3,1", "sweep.baseline=false", "train.max_steps=1000000", "train.epochs=100000",
            "train.checkpoint_every=1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"output_dir={tmp_path}"]
    sweep = subprocess.Popen(dynbert_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "DYNBERT_TEST_MARK": mark})
    checkpoints = [tmp_path / "synthetic" / f"gates-lambda{lam}-seed0" / "checkpoint.pt" for lam in ("0.1", "0.3")]
    try:
        deadline = time.monotonic() + 120
        while not all(path.exists() for path in checkpoints) and sweep.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sweep.poll() is None, sweep.communicate()[1]
        sweep.send_signal(signal.SIGTERM)
        _, stderr = sweep.communicate(timeout=120)
    finally:  # a failing run must not leave runs training forever
        for pid in _processes_marked(mark):
            os.kill(pid, signal.SIGKILL)

    assert sweep.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "run the same command again" in stderr and "Traceback" not in stderr
    assert summary(stderr) == "done 0, skipped (already complete) 0, failed 0, interrupted 3"
    assert statuses(tmp_path)["gates-lambda1-seed0"]["error"] == "not started: the sweep was stopped"
    assert not (tmp_path / "synthetic" / "gates-lambda1-seed0" / "checkpoint.pt").exists()
    for path in checkpoints:
        assert torch.load(path, weights_only=True)["step"] >= 1
        assert not (path.parent / ".dynbert-lock").exists()
    assert _processes_marked(mark) == []


def _processes_marked(mark: str) -> list[int]:
    """Live processes whose environment holds ``DYNBERT_TEST_MARK=mark``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"DYNBERT_TEST_MARK={mark}".encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_a_launcher_worker_killed_by_the_stop_signal_ends_the_multirun_quietly(monkeypatch, capsys):
    """SIGTERM while joblib's workers still start kills them before they handle it: joblib raises
    TerminatedWorkerError, which Hydra printed as a 30-line trace before the sweep's own sentence."""
    import hydra
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    from dynbert import stop, sweep

    def launcher_dies(*args, **kwargs):
        def run(task):
            def multirun():
                stop._handle(signal.SIGTERM, None)  # recorded (deferred), as the real signal is
                raise TerminatedWorkerError("A worker process managed by the executor was unexpectedly terminated")
            return multirun
        return run

    monkeypatch.setattr(hydra, "main", launcher_dies)
    monkeypatch.setattr(stop, "_requested", None)
    monkeypatch.setattr(stop, "install", lambda: None)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with pytest.raises(SystemExit) as stopped:
        sweep._main()
    assert stopped.value.code == 128 + signal.SIGTERM and capsys.readouterr().err == ""


@pytest.mark.slow
def test_a_sweep_over_two_methods_runs_each_with_its_own_knob_and_the_report_shows_both(tmp_path):
    """λ goes to gates, method.keep to top-k (gates has no keep: it would not even compose)."""
    result = run_dynbert(*SWEEP, "method=gates,topk", "lambda=0.1", "method.keep=0.5,1.0", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert summary(result.stderr) == "done 4, skipped (already complete) 0, failed 0"
    assert {path.parent.name for path in tmp_path.glob("synthetic/*/metrics.json")} == {
        "gates-lambda0.1-seed0", "topk-keep0.5-seed0", "topk-keep1.0-seed0", "none-lambda0-seed0"}
    assert read_json(tmp_path / "synthetic" / "topk-keep0.5-seed0" / "metrics.json")["knob_value"] == 0.5

    report = invoke("report", tmp_path)
    assert report.exit_code == 0, report.output
    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:5] == ["run_dir", "task", "method", "knob", "knob_value"]
    assert sorted((row["method"], row["knob"], row["knob_value"]) for row in rows) == [
        ("gates", "lambda", "0.1"), ("none", "", ""), ("topk", "method.keep", "0.5"), ("topk", "method.keep", "1.0")]
    md = (tmp_path / "report.md").read_text()
    assert "| gates | λ | 0.1 |" in md and "| topk | keep | 0.5 |" in md and "| none | — | baseline |" in md


def test_plan_gives_each_method_its_own_grid_and_routes_keys_to_the_methods_that_have_them():
    from dynbert.errors import DynbertError
    from dynbert.sweep import plan_sweep

    _, runs, _ = plan_sweep(["method=gates,power_bert,ltp,topk,random", "seed=0,1", "method.lr=0.01"])
    by_method = {next(line for line in run if line.startswith("method=")): run for run in runs}
    assert list(by_method) == ["method=gates", "method=power_bert", "method=ltp", "method=topk", "method=random",
                               "method=none"]
    assert "lambda=0,0.01,0.03,0.1,0.3,1" in by_method["method=gates"]
    assert "lambda=0,0.0001,0.0003,0.001,0.003,0.007" in by_method["method=power_bert"]
    assert "lambda=0,0.01,0.02,0.05,0.1,0.2" in by_method["method=ltp"]
    for keep_method in ("method=topk", "method=random"):
        assert "method.keep=0.1,0.2,0.3,0.5,0.7,1.0" in by_method[keep_method]
        assert not any(line.startswith(("lambda", "method.lr")) for line in by_method[keep_method])
    assert all("seed=0,1" in run for run in runs)  # every method, the baseline too
    assert "method.lr=0.01" in by_method["method=ltp"]  # a method.* key goes where the key exists
    assert by_method["method=none"][:2] == ["method=none", "lambda=0"]

    # A knob on the command line replaces the grid of the methods whose knob it is, and only theirs.
    _, runs, _ = plan_sweep(["method=gates,ltp,random", "lambda=0,0.5"])
    assert sum("lambda=0,0.5" in run for run in runs) == 2
    # A key that no swept method has is one sentence, before anything runs.
    with pytest.raises(DynbertError, match="method.keep is the knob of random, tome, topk"):
        plan_sweep(["method=gates,ltp", "method.keep=0.5"])
    with pytest.raises(DynbertError, match="lambda is the knob of .*no swept method \\(topk\\)"):
        plan_sweep(["method=topk", "lambda=0,0.1"])


def test_one_value_in_an_experiments_sweep_params_plans_one_value():
    # `lambda: 0.2` in sweep.params (experiment=glue-minilm-sst2-8ep) used to stop the sweep with
    # Hydra's "Can only enumerate CHOICE and RANGE sweeps" before any run.
    from dynbert.sweep import plan_jobs, plan_sweep

    folder, runs, cfg = plan_sweep(["experiment=glue-minilm-sst2-8ep"])
    jobs = plan_jobs(folder, runs)
    assert cfg.train.epochs == 8 and folder == Path("outputs/sweeps/glue-minilm-sst2-8ep")
    assert sorted(str(run_dir.relative_to(folder)) for run_dir, _ in jobs) == [
        f"sst2/{name}-seed{seed}" for name in ("gates-lambda0.2", "none-lambda0") for seed in (0, 1, 2)]


@pytest.mark.slow
def test_a_non_ascii_output_dir_sweeps_as_train_and_the_dry_run_take_it(tmp_path):
    """The folder went to the multirun as an override, and Hydra's lexer refused `é` there."""
    folder = tmp_path / "swé"
    args = [*SWEEP, "lambda=0.1", "sweep.baseline=false", f"output_dir='{folder}'"]
    dry = invoke(*args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.splitlines() == [f"{folder}/synthetic/gates-lambda0.1-seed0", str(folder)]
    result = run_dynbert(*args)
    assert result.returncode == 0, result.stderr
    assert summary(result.stderr) == "done 1, skipped (already complete) 0, failed 0"
    assert (folder / "synthetic" / "gates-lambda0.1-seed0" / "metrics.json").is_file()


@pytest.mark.parametrize("swept", ["lambda=range(1,1)", "seed=range(0,0)"])
def test_a_swept_key_without_values_fails_before_any_run(tmp_path, swept):
    """lambda=range(1,1) ran only the baseline and exited 0."""
    result = invoke(*SWEEP, swept, f"output_dir={tmp_path}", "--dry-run")
    assert result.exit_code == 2, result.output
    assert f"error: {swept} gives no values, so none of its runs would train" in " ".join(result.stderr.split())


def test_lambda_still_goes_only_to_the_methods_whose_knob_it_is():
    from dynbert.sweep import plan_sweep

    _, runs, _ = plan_sweep(["method=gates,topk", "lambda=0.1"])  # topk's jobs do not get it, so no error
    assert ["lambda=0.1" in run for run in runs] == [True, False, False]


def test_a_run_folder_dynbert_did_not_write_fails_the_sweep_before_any_run(tmp_path):
    mine = tmp_path / "synthetic" / "gates-lambda0.3-seed0"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine\n")
    result = invoke(*SWEEP, "lambda=0.1,0.3", f"output_dir={tmp_path}")
    assert result.exit_code == 2, result.output
    assert f"output_dir {mine} already holds files that dynbert did not write (notes.txt)" in result.stderr
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["gates-lambda0.3-seed0", "notes.txt", "synthetic"]


@pytest.mark.slow
def test_a_run_another_process_holds_is_left_to_it_and_counted_as_in_use(tmp_path):
    """It printed 'failed: ... in use by process N', wrote a status into that process's folder,
    and the summary said 'failed 0, did not report 1'."""
    held = tmp_path / "synthetic" / "gates-lambda0.1-seed0"
    held.mkdir(parents=True)
    (held / ".dynbert-lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                    "since": time.time()}))
    result = run_dynbert(*SWEEP, "lambda=0.1", "sweep.baseline=false", f"output_dir={tmp_path}")
    assert result.returncode == 1, result.stderr
    assert f"in use by process {os.getpid()}" in result.stderr and "Traceback" not in result.stderr
    assert summary(result.stderr) == "done 0, skipped (already complete) 0, failed 0, in use by another process 1"
    assert sorted(path.name for path in held.iterdir()) == [".dynbert-lock"]  # nothing written into its folder


def test_a_run_another_process_completed_counts_as_complete_not_failed(tmp_path):
    from rich.console import Console

    from dynbert.sweep import _summarize

    from test_report import write_run

    ours = write_run(tmp_path, "synthetic/gates-lambda0-seed0", task="synthetic")
    (ours / "status.json").write_text(json.dumps(dict(sweep_id="ours", task="synthetic", method="gates",
                                                      knob="lambda0", seed=0, run_dir=str(ours), status="done")))
    theirs = write_run(tmp_path, "synthetic/gates-lambda0.1-seed0", task="synthetic", **{"lambda": 0.1})
    (theirs / "status.json").write_text(json.dumps(dict(sweep_id="theirs", task="synthetic", method="gates",
                                                        knob="lambda0.1", seed=0, run_dir=str(theirs), status="done")))
    console = Console(record=True, width=200)
    assert _summarize(tmp_path, "ours", [ours, theirs], console, stopped=False) == 0
    assert console.export_text().splitlines()[-1] == (
        "done 1, skipped (already complete) 0, failed 0, completed by another process 1")
    lost = tmp_path / "synthetic" / "gates-lambda0.3-seed0"  # its job failed before it could report
    assert _summarize(tmp_path, "ours", [ours, theirs, lost], console, stopped=False) == 1
    assert console.export_text().splitlines()[-1] == (
        "done 1, skipped (already complete) 0, failed 1, completed by another process 1")


def test_a_sweep_params_key_on_the_command_line_replaces_the_sweeps_values_for_that_key(tmp_path):
    """`sweep.params.lambda=0.1,0.3` once swept the key `sweep.params.lambda` itself: twice the runs, odd names."""
    result = invoke(*SWEEP, "sweep.params.lambda=0.1,0.3", f"output_dir={tmp_path}", "--dry-run")
    assert result.exit_code == 0, result.output
    *folders, _ = result.stdout.strip().splitlines()
    assert sorted(Path(folder).relative_to(tmp_path).as_posix() for folder in folders) == [
        "synthetic/gates-lambda0.1-seed0", "synthetic/gates-lambda0.3-seed0", "synthetic/none-lambda0-seed0"]
