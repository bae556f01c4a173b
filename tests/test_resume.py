"""Stopped anywhere, resumed exactly: a run interrupted by SIGTERM or SIGINT at any point of a step,
then run again, ends with the uninterrupted run's metrics and weights to the last digit; a sweep
whose `dynbert sweep` process is killed outright leaves no job training in the background."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import psutil
import pytest
import torch
from safetensors.torch import load_file

import dynbert.core
import dynbert.train
from dynbert import stop
from dynbert.config import compose_config
from dynbert.methods.gates import Gates
from dynbert.train import TrainingInterrupted, train

from helpers import FAST, SYNTHETIC, comparable, dynbert_command, read_json, run_dynbert

pytestmark = pytest.mark.slow  # every test trains twice, stopping one run by a signal

# Gates that move from the first step, so one step taken twice (or skipped) changes the result.
MOVING_GATES = ["lambda=1", "method.start=0", "method.bimodal_weight=0", "method.lr=0.1"]
# One thread: the reference run (a module fixture) is made before the per-test fixture sets it.
RUN = [*FAST, *SYNTHETIC, *MOVING_GATES, "train.epochs=2", "train.max_steps=10", "train.checkpoint_every=4", "train.num_threads=1"]


@pytest.fixture
def own_signals():
    """train() routes SIGINT/SIGTERM through dynbert in this process; put everything back after."""
    saved = {signum: signal.getsignal(signum) for signum in stop.SIGNALS}
    # As a command started at a terminal has them: pytest started in the background (`cmd &` in a
    # script) inherits SIGINT ignored, which dynbert rightly leaves alone.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    stop._requested = None
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def signal_on_call(monkeypatch, owner, name: str, call: int, signum: int) -> None:
    """Send ``signum`` to this process from inside ``owner.name``'s ``call``-th call, right after the
    original returns: the handler runs at exactly that point of the step, whatever the machine's load."""
    original, calls = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(None)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(owner, name, wrapped)


# Points inside a training step where a signal can land: (what runs just before it, which call).
STOP_POINTS = {
    "while a batch is collated (step 3)": (dynbert.train, "collate", 3),
    "in the forward pass (step 5)": (dynbert.core.GatedModel, "forward", 5),
    "after the optimizer step, before the step counter moves (step 6)": (torch.optim.AdamW, "step", 6),
    "after the lr schedule's step (step 7)": (torch.optim.lr_scheduler.LambdaLR, "step", 7),
    "after the gates' projection (step 2)": (Gates, "after_step", 2),
    "right after the checkpoint of step 4": (dynbert.train, "save_checkpoint", 1),
    "right after the checkpoint of step 8": (dynbert.train, "save_checkpoint", 2),
}
CASES = [(point, signum) for point in STOP_POINTS for signum in (signal.SIGTERM, signal.SIGINT)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole")
    metrics = train(compose_config([*RUN, f"output_dir={run_dir}"]))
    return metrics, run_dir


@pytest.mark.parametrize("point, signum", CASES, ids=[f"{p} {signal.Signals(s).name}" for p, s in CASES])
def test_a_run_stopped_anywhere_in_a_step_resumes_to_the_uninterrupted_result(
        tmp_path, monkeypatch, own_signals, uninterrupted, point, signum):
    whole, whole_dir = uninterrupted
    cfg = compose_config([*RUN, f"output_dir={tmp_path}"])
    owner, name, call = STOP_POINTS[point]
    with monkeypatch.context() as patch:
        signal_on_call(patch, owner, name, call, signum)
        with pytest.raises(TrainingInterrupted) as stopped:
            train(cfg)
    assert stopped.value.exit_code == 128 + signum
    assert not (tmp_path / "metrics.json").exists()
    stop._requested = None  # a new process, as the user's next command is

    resumed = train(cfg)
    assert comparable(resumed) == comparable(whole)
    for file in ("model.safetensors", "method.safetensors"):
        a, b = (load_file(folder / "model" / file) for folder in (whole_dir, tmp_path))
        assert all(torch.equal(a[key], b[key]) for key in a), file


SWEEP = ["sweep", *RUN, "lambda=1", "sweep.baseline=false", "train.epochs=5", "train.max_steps=40",
         "train.checkpoint_every=3"]


@pytest.fixture(scope="module")
def uninterrupted_sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole-sweep")
    whole = run_dynbert(*SWEEP, f"output_dir={folder}")
    assert whole.returncode == 0, whole.stderr
    return folder


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_sweep_stopped_mid_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted_sweep, signum):
    """The signal comes from outside, while the run trains (when its first checkpoint appears):
    wherever it lands, the re-run sweep must end where an uninterrupted one does."""
    stopped_dir = tmp_path / "stopped"
    sweep = subprocess.Popen(dynbert_command(*SWEEP, f"output_dir={stopped_dir}"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    checkpoint = stopped_dir / "synthetic" / "gates-lambda1-seed0" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    sweep.send_signal(signum)
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 128 + signum, stderr  # stopped mid-run, not after it finished
    again = run_dynbert(*SWEEP, f"output_dir={stopped_dir}")
    assert again.returncode == 0, again.stderr

    run = "synthetic/gates-lambda1-seed0/metrics.json"
    assert comparable(read_json(stopped_dir / run)) == comparable(read_json(uninterrupted_sweep / run))


def test_killing_the_sweep_outright_stops_its_jobs_each_checkpointed(tmp_path):
    """`kill -9` (or the out-of-memory killer) on `dynbert sweep` cannot pass a stop on; its multirun
    process, in a process group of its own, must see its parent gone and stop every job itself."""
    mark = f"dynbert-test-{uuid.uuid4().hex}"
    args = ["sweep", *FAST, *SYNTHETIC, "lambda=0.1,0.3", "sweep.baseline=false", "train.max_steps=1000000",
            "train.epochs=100000", "train.checkpoint_every=1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            f"output_dir={tmp_path}"]
    sweep = subprocess.Popen(dynbert_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "DYNBERT_TEST_MARK": mark})
    checkpoints = [tmp_path / "synthetic" / f"gates-lambda{lam}-seed0" / "checkpoint.pt" for lam in ("0.1", "0.3")]
    try:
        deadline = time.monotonic() + 120
        while not all(path.exists() for path in checkpoints) and sweep.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sweep.poll() is None
        children = psutil.Process(sweep.pid).children(recursive=True)
        assert children, "the sweep started no job process"
        sweep.kill()
        sweep.wait()
        _, alive = psutil.wait_procs(children, timeout=90)
        assert alive == [], f"still running after their parent was killed: {[p.pid for p in alive]}"
    finally:
        for pid in _processes_marked(mark):
            os.kill(pid, signal.SIGKILL)

    for path in checkpoints:  # each job stopped at a step boundary, checkpointed and unlocked
        assert torch.load(path, weights_only=True)["step"] >= 1
        assert not (path.parent / ".dynbert-lock").exists()


def _processes_marked(mark: str) -> list[int]:
    """Live processes whose environment holds ``DYNBERT_TEST_MARK=mark``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("DYNBERT_TEST_MARK") == mark:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


# LTP with a FLOPs target settles its thresholds on dev where they freeze (step 5 of 10) and after the
# last step: passes of hard mode in the middle of the loop, which a stop must not split from their step.
LTP_RUN = [*FAST, *SYNTHETIC, "method=ltp", "method.target=0.6", "method.start=0.1", "method.freeze_at=0.5",
           "train.epochs=2", "train.max_steps=10", "train.checkpoint_every=4", "train.num_threads=1"]


@pytest.fixture(scope="module")
def uninterrupted_ltp(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole-ltp")
    return train(compose_config([*LTP_RUN, f"output_dir={run_dir}"])), run_dir


@pytest.mark.parametrize("call", [6, 11], ids=["as the thresholds freeze (step 5)", "after the last step"])
def test_ltp_stopped_while_it_settles_its_thresholds_resumes_to_the_uninterrupted_result(
        tmp_path, monkeypatch, own_signals, uninterrupted_ltp, call):
    from dynbert.methods.ltp import LearnedTokenPruning

    whole, whole_dir = uninterrupted_ltp
    assert "FLOPs ratio" in (whole_dir / "train.log").read_text()
    cfg = compose_config([*LTP_RUN, f"output_dir={tmp_path}"])
    with monkeypatch.context() as patch:
        signal_on_call(patch, LearnedTokenPruning, "settle", call, signal.SIGTERM)
        with pytest.raises(TrainingInterrupted):
            train(cfg)
    stop._requested = None
    resumed = train(cfg)
    assert comparable(resumed) == comparable(whole)
    for file in ("model.safetensors", "method.safetensors"):
        a, b = (load_file(folder / "model" / file) for folder in (whole_dir, tmp_path))
        assert all(torch.equal(a[key], b[key]) for key in a), file
