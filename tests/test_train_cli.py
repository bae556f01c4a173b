"""`dynbert train` end to end: the run folder on every task layout, reproducibility, offline errors."""

from __future__ import annotations

import math
from pathlib import Path
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from dynbert.config import compose_config, conf_dir
from dynbert.train import load_run

from glue_data import GLUE_TASKS, write_glue_run_folder
from helpers import CONTRACT_KEYS, FAST, SYNTHETIC, comparable, dynbert_command, invoke, read_json

# What `metrics` holds per task (the main metric, and MNLI's mismatched set with `_mm`).
TASK_METRICS = {
    "cola": {"matthews_correlation"},
    "mrpc": {"accuracy", "f1", "combined_score"},
    "qqp": {"accuracy", "f1", "combined_score"},
    "stsb": {"pearson", "spearmanr", "combined_score"},
    "mnli": {"accuracy", "accuracy_mm"},
    **{task: {"accuracy"} for task in ("sst2", "qnli", "rte", "wnli", "synthetic")},
}
MODEL_FILES = {"config.json", "model.safetensors", "method.safetensors", "tokenizer.json", "tokenizer_config.json"}


@pytest.mark.parametrize("task", [*GLUE_TASKS, "synthetic"])
def test_train_writes_the_run_folder(tmp_path, task):
    run_dir = tmp_path / "run"
    if task == "synthetic":
        data = SYNTHETIC
    else:
        data = [f"task={task}", "model=tiny", f"task.data_dir={write_glue_run_folder(tmp_path / 'glue', task)}"]
    result = invoke("train", *FAST, *data, f"output_dir={run_dir}")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == str(run_dir.resolve())
    metrics = read_json(run_dir / "metrics.json")
    assert CONTRACT_KEYS <= set(metrics)
    assert metrics["task"] == task and metrics["lambda"] == 0.1 and metrics["seed"] == 0
    assert set(metrics["metrics"]) == TASK_METRICS[task]
    assert metrics["score"] == metrics["metrics"][metrics["metric"]]
    assert all(math.isfinite(value) for value in metrics["metrics"].values())
    assert math.isfinite(metrics["score_soft"])
    assert len(metrics["kept_per_layer"]) == 2
    if task == "stsb":
        assert metrics["most_predicted"] is None
    else:  # the class predicted most, its share and the score of always answering it
        assert set(metrics["most_predicted"]) == {"label", "share", "constant_score"}
    assert metrics["flops_ratio"] == pytest.approx(metrics["flops_per_example"] / metrics["baseline_flops_per_example"])
    assert MODEL_FILES <= {path.name for path in (run_dir / "model").iterdir()}
    assert OmegaConf.load(run_dir / "config.yaml").task.name == task
    assert not (run_dir / "checkpoint.pt").exists()  # removed once the run is complete
    # The saved model loads back with the run's gates, hardened to exactly 0/1.
    gates = load_run(run_dir).method.gates()
    assert torch.all((gates == 0) | (gates == 1))


def test_a_run_that_pruned_nothing_says_so_and_what_to_change(tmp_path):
    """λ > 0 but the gates never got to move (they start after the last of 4 steps): FLOPs ratio 1.0,
    which must not pass as a result: a warning in metrics.json and in the summary, with advice."""
    result = invoke("train", *FAST, *SYNTHETIC, "lambda=0.3", "method.start=0.99", f"output_dir={tmp_path}")
    assert result.exit_code == 0, result.output
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["flops_ratio"] == pytest.approx(1.0)
    [warning] = not_one_class(metrics["warnings"])
    assert warning.startswith("no token was pruned (FLOPs ratio 1.000)") and "method.start" in warning
    assert f"warning: {warning}" in " ".join(result.stderr.split())


def test_a_run_that_asked_for_no_pruning_is_not_warned_that_it_pruned_nothing(tmp_path):
    """λ = 0 and gates that stay exactly open (method.lr=0): FLOPs ratio 1.0 is what was asked for."""
    result = invoke("train", *FAST, *SYNTHETIC, "lambda=0", "method.lr=0", f"output_dir={tmp_path}")
    assert result.exit_code == 0, result.output
    assert not_one_class(read_json(tmp_path / "metrics.json")["warnings"]) == []
    assert "no token was pruned" not in result.stderr


def not_one_class(warnings: list[str]) -> list[str]:
    """A 4-step run of a tiny model answers one class, and says so: that warning is not these tests'."""
    return [warning for warning in warnings if "of the dev predictions are" not in warning]


def test_train_seconds_is_the_training_loops_time(tmp_path):
    started = time.perf_counter()
    result = invoke("train", *FAST, *SYNTHETIC, "train.epochs=6", "train.max_steps=null", "train.batch_size=16",
                    f"output_dir={tmp_path}")
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    # The loop is most of this command: counted twice, it would exceed the whole command's time.
    assert 0 < read_json(tmp_path / "metrics.json")["train_seconds"] <= elapsed


# Gates that move within a few steps: the comparisons below then cover them too.
MOVING_GATES = ["lambda=1", "method.start=0", "method.bimodal_weight=0", "method.lr=0.1"]


@pytest.mark.slow
def test_same_command_twice_gives_the_same_run(tmp_path):
    # Two processes, as a user would run them: a tokenizer trained in hash order differed between them.
    args = ["train", *FAST, *SYNTHETIC, *MOVING_GATES, "train.max_steps=6"]
    processes = [subprocess.Popen(dynbert_command(*args, f"output_dir={tmp_path / name}"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in "ab"]
    for name, process in zip("ab", processes):
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        assert stdout.splitlines() == [str((tmp_path / name).resolve())]  # the folder alone, for scripts
    first, second = (read_json(tmp_path / name / "metrics.json") for name in "ab")
    assert comparable(first) == comparable(second)
    assert first["flops_ratio"] < 1  # the gates did close: a real comparison, not two untouched models
    for name in ("model.safetensors", "method.safetensors"):
        a, b = (load_file(tmp_path / run / "model" / name) for run in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name


def test_hub_name_offline_is_one_clear_line(tmp_path):
    result = invoke("train", *FAST, *SYNTHETIC, "model.name_or_path=bert-base-uncased", f"output_dir={tmp_path / 'run'}")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "model.name_or_path=" in result.stderr and "bert-base-uncased" in result.stderr
    assert "Traceback" not in result.output


def test_glue_task_without_data_dir_offline_says_to_pass_one(tmp_path):
    result = invoke("train", *FAST, "task=rte", "model=tiny", f"output_dir={tmp_path / 'run'}")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "task.data_dir=" in result.stderr and "'rte'" in result.stderr
    assert "Traceback" not in result.output


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("name", sorted(path.stem for path in (conf_dir() / "experiment").glob("*.yaml")))
def test_every_experiment_config_runs_a_few_steps(tmp_path, name):
    """An experiment file that composes but cannot train (a key no code reads, a launcher that is
    not installed) would first fail in a user's hands: run each for a handful of steps, with the
    tiny model where it trains from scratch and the real files where it needs a pretrained one."""
    if compose_config([f"experiment={name}"]).model.name_or_path is None:
        data = [*FAST, *SYNTHETIC]
    elif (SHARED / "models" / "all-MiniLM-L6-v2").is_dir():
        data = ["debug=fast", "task=rte", f"glue_dir={SHARED / 'glue'}",
                f"model.name_or_path={SHARED / 'models' / 'all-MiniLM-L6-v2'}"]
    else:
        pytest.skip(f"experiment={name} needs a pretrained model; {SHARED} (../shared/data) is absent")
    result = invoke("train", f"experiment={name}", *data, f"output_dir={tmp_path}")
    assert result.exit_code == 0, result.output
    assert read_json(tmp_path / "metrics.json")["steps"] == 4


@pytest.mark.slow
def test_two_processes_train_one_run_folder_written_once(tmp_path):
    """`torchrun --nproc_per_node 2` (what `accelerate launch` does on several GPUs): DDP over gloo
    on this CPU. Each step's batch is split across the processes; only the main one writes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "dynbert.cli", "train", *FAST, *SYNTHETIC, "train.device=cpu", f"output_dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [str(tmp_path.resolve())]  # one summary, one folder line
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["steps"] == 4 and CONTRACT_KEYS <= set(metrics)
    assert sorted(path.name for path in tmp_path.iterdir()) == [".dynbert-run", "config.yaml", "metrics.json",
                                                               "model", "train.log"]
    assert (tmp_path / "train.log").read_text().count("done:") == 1
