"""`dynbert sweep`: a Hydra multirun of `dynbert train` runs, resumable.

The CLI side (`run_sweep`) reads the sweep config, hands Hydra its overrides in a subprocess
(`python -m dynbert.sweep --multirun ...`: `@hydra.main` owns sys.argv, and Hydra's launchers,
joblib or submitit, need its own multirun machinery), then summarises. Each job (`job`) is one
`train(cfg)` in its own folder `<sweep>/<task>/<run_name>[-<key>=<value>...]`: the run name holds
the method, its knob (λ, keep or a FLOPs target) and the seed, and every other swept key of the run's
identity (``rundir.run_identity``) is appended, so two jobs never share a folder and re-running the
sweep finds finished runs and skips them.

Signals: the sweep's jobs run in their own process group. Ctrl-C or SIGTERM on `dynbert sweep`
is passed to that group as SIGTERM: running jobs checkpoint and stop, jobs not yet started do not
start, and nothing is left running in the background. If `dynbert sweep` dies without a word
(SIGKILL, out of memory), its multirun process sees its parent gone and stops the group itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from .console import print_table
from .declarations import folder_keys, method_declaration, method_knob, method_names, run_knob
from .errors import DynbertError, atomic_write_json, check_writable_folder, first_line

_SWEEP_ID, _SWEEP_TOTAL, _SWEEP_PARENT = "DYNBERT_SWEEP_ID", "DYNBERT_SWEEP_TOTAL", "DYNBERT_SWEEP_PARENT"
_SWEEP_DIR = "DYNBERT_SWEEP_DIR"


class SweepInterrupted(DynbertError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _split_overrides(overrides: list[str]):
    """(plain overrides for compose, sweep overrides by key) using Hydra's own parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from .config import _explain, expand_home

    try:
        parsed = OverridesParser.create().parse_overrides(expand_home(overrides))
    except HydraException as error:
        raise DynbertError(f"bad override: {_explain(error)}") from error
    # `sweep.params.task=sst2,stsb` means `task=sst2,stsb`: a sweep's own values for a key are replaced by
    # the command line's. Passed on as written, Hydra would sweep the key `sweep.params.task` itself.
    lines = [(o.input_line.removeprefix(SWEEP_PARAMS), o.is_sweep_override()) for o in parsed]
    plain = [line for line, is_sweep in lines if not is_sweep]
    swept = {_key(line): line for line, is_sweep in lines if is_sweep}
    return plain, swept


SWEEP_PARAMS = "sweep.params."


def plan_jobs(folder: Path, multiruns: list[list[str]]) -> list[tuple[Path, list[str]]]:
    """Every job of the sweep, as (its run folder, its overrides), composed as the job will be.

    Two jobs that would share a folder are refused here: the second would be skipped as done. So are a
    run folder holding files dynbert did not write and a GLUE folder without the task's files: their
    jobs would fail one by one, after others had trained."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .config import compose_config
    from .rundir import refuse_foreign
    from .tasks import check_data_dir, get_task, glue_data_dir

    jobs, seen = [], {}
    for runs in multiruns:
        parsed = OverridesParser.create().parse_overrides(runs)
        for batch in BasicSweeper.split_arguments(parsed, None):
            for job_overrides in batch:
                cfg = compose_config(list(job_overrides))
                run_dir = run_folder(folder, cfg, list(job_overrides))
                spec = get_task(cfg.task.name)
                data_dir = None if spec.name == "synthetic" else glue_data_dir(cfg, spec)
                if data_dir is not None:
                    check_data_dir(spec, data_dir)
                if run_dir in seen:
                    raise DynbertError(f"two runs of this sweep would share {run_dir} ({' '.join(seen[run_dir])} "
                                       f"and {' '.join(job_overrides)}): add the key that tells them apart to the run name")
                refuse_foreign(run_dir)
                seen[run_dir] = job_overrides
                jobs.append((run_dir, list(job_overrides)))
    return jobs


def _key(line: str) -> str:
    return line.split("=", 1)[0].lstrip("+~")


def plan_sweep(overrides: list[str]) -> tuple[Path, list[list[str]], DictConfig]:
    """The sweep folder and the override lists of its multiruns: one per method, then the baseline.

    Each method varies its own knob over its own values (its YAML's ``knob`` and ``grid``: λ for the
    λ methods, ``method.keep`` for the keep-schedule ones). A knob given on the command line or in
    ``sweep.params`` replaces those values for every method whose knob it is, and only for those. A
    ``method.*`` key goes to the methods whose config has it; any other key goes to every method.
    The baseline (each method whose YAML declares no knob: ``method=none``) runs once per task and
    seed, at λ = 0, unless ``sweep.baseline=false``.
    """
    from .config import compose_config

    plain, swept = _split_overrides(overrides)
    given = {_key(line): line for line in plain} | {_key(key): line for key, line in swept.items()}
    knob_owners = _knob_owners()
    # What every method gets; a knob (λ, keep) only goes to its own methods, checked in their jobs below.
    common = [line for line in plain if not _key(line).startswith("method") and _key(line) not in knob_owners]
    cfg = compose_config(common + [line for line in plain if _key(line) == "method"])
    methods = _values(swept["method"]) if "method" in swept else [cfg.method.name]
    probes = {name: compose_config(common + [f"method={name}"]) for name in dict.fromkeys(methods)}
    if cfg.sweep.baseline:
        for name in _baselines():
            probes.setdefault(name, compose_config(common + [f"method={name}"]))
    for key in given:
        if key != "method" and not any(_routes(key, probe, knob_owners) for name, probe in probes.items()
                                       if name in methods):
            raise DynbertError(_unrouted_message(key, methods, knob_owners))

    folder = Path(cfg.output_dir) if "output_dir" in given else Path("outputs/sweeps") / cfg.sweep.name
    check_writable_folder(folder, "output_dir=")
    runs = []
    for name, probe in probes.items():
        passed = [line for line in plain if _key(line) not in ("method", "output_dir")
                  and _routes(_key(line), probe, knob_owners)]
        grid = {key: line for key, line in ((_key(k), v) for k, v in swept.items())
                if key != "method" and _routes(key, probe, knob_owners)}
        for key, values in probe.sweep.params.items():
            if key not in given and _routes(key, probe, knob_owners):
                grid[key] = f"{key}={values}"
        knob = method_knob(probe.method)
        # A FLOPs target replaces the method's knob: its λ grid is not swept beside it.
        targeted = ("method.target" in grid or any(_key(line) == "method.target" for line in passed)
                    or probe.method.get("target") is not None)
        if knob is not None and knob.key not in given and knob.key not in grid and not targeted:
            grid[knob.key] = f"{knob.key}={','.join(str(value) for value in probe.method.grid)}"
        fixed = [f"method={name}"] + (["lambda=0"] if knob is None else [])
        _check_values(passed + fixed, grid)
        # Each job names its folder after these keys (see `run_folder`).
        runs.append(passed + fixed + [f"sweep.swept_keys=[{','.join(sorted(grid))}]"] + list(grid.values()))
    return folder, runs, cfg


def _check_values(fixed: list[str], grid: dict[str, str]) -> None:
    """Compose with every value of each swept key (the others at their first), so a bad key or
    value fails here, before any run, not as one failed job among many."""
    from .config import compose_config

    values = {key: _values(line) for key, line in grid.items()}
    for key, choices in values.items():
        if not choices:  # range(1,1): the sweep would run nothing of it, or only the baseline, and exit 0
            raise DynbertError(f"{grid[key]} gives no values, so none of its runs would train: pass at least "
                               "one (range's end is not included: range(1,2) is 1)")
    probe = {key: f"{key}={choices[0]}" for key, choices in values.items()}
    compose_config(fixed + list(probe.values()))
    for key, choices in values.items():
        for value in choices[1:]:
            compose_config(fixed + list({**probe, key: f"{key}={value}"}.values()))


def _knob_owners() -> dict[str, list[str]]:
    """Each knob key (``lambda``, ``method.keep``) and the methods whose YAML declares it their knob."""
    owners: dict[str, list[str]] = {}
    for name in method_names():
        knob = method_knob(method_declaration(name))
        if knob is not None:
            owners.setdefault(knob.key, []).append(name)
    return owners


def _baselines() -> list[str]:
    """The methods whose YAML declares no knob: they prune nothing, so a sweep runs them once."""
    return [name for name in method_names() if method_knob(method_declaration(name)) is None]


def _routes(key: str, probe: DictConfig, knob_owners: dict[str, list[str]]) -> bool:
    """Whether an override of ``key`` belongs to the jobs of the method ``probe`` was composed for."""
    if key in knob_owners:
        knob = run_knob(probe)
        return knob is not None and key == knob.key
    if key.startswith("method."):
        return OmegaConf.select(probe, key, default=_ABSENT) is not _ABSENT
    return True


_ABSENT = object()


def _unrouted_message(key: str, methods: list[str], knob_owners: dict[str, list[str]]) -> str:
    names = ", ".join(methods)
    if key in knob_owners:
        return (f"{key} is the knob of {', '.join(knob_owners[key])}, and no swept method ({names}) has it: "
                f"sweep one of those methods, or drop {key}")
    return (f"{key} is a key of no swept method ({names}): see a method's keys with "
            "`dynbert train method=<name> --cfg`")


def _values(line: str) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_overrides([line])[0]
    if not override.is_sweep_override():  # one value, as `lambda: 0.2` in an experiment's sweep.params
        return [override.get_value_element_as_str()]
    return [str(value) for value in override.sweep_iterator()]


def run_folder(sweep_dir: Path, cfg: DictConfig, job_overrides: list[str]) -> Path:
    """``<sweep>/<task>/<run_name>`` plus ``-<key>=<value>`` for each swept key the name does not show
    (``declarations.folder_keys``) that is part of the run's identity (``rundir.run_identity``): jobs
    that differ only in how they run would be one result, and share a folder."""
    from .rundir import ignored

    given = {_key(line): line.split("=", 1)[1] for line in job_overrides if "=" in line}
    shown = folder_keys(cfg)
    extra = [f"-{key}={_slug(given[key])}" for key in cfg.sweep.swept_keys
             if key in given and key not in shown and not ignored(key)]
    return Path(sweep_dir) / cfg.task.name / (cfg.run_name + "".join(extra))


def _slug(value: str) -> str:
    """A value as a folder-name part: readable when it can be, unique always."""
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", value)
    if safe == value and len(value) <= 40:
        return value
    return f"{safe[-24:].lstrip('_')}~{hashlib.sha1(value.encode()).hexdigest()[:6]}"


def run_sweep(overrides: list[str], console: Console) -> tuple[Path, int]:
    """Run every job of the sweep not already complete; print a summary; return (folder, failed)."""
    folder, multiruns, _ = plan_sweep(overrides)
    sweep_id = f"{time.time_ns()}"
    run_dirs = [run_dir for run_dir, _ in plan_jobs(folder, multiruns)]  # a bad job or a shared folder fails now
    total = len(run_dirs)
    console.print(f"sweep: {total} runs into {folder}")
    from .config import conf_dir, search_path_overrides

    env = dict(os.environ, **{_SWEEP_ID: sweep_id, _SWEEP_TOTAL: str(total), _SWEEP_PARENT: str(os.getpid()),
                              _SWEEP_DIR: str(folder)})
    stopped = None
    for runs in multiruns:
        # hydra.sweep.subdir=.: each job computes its own folder (run_folder); Hydra writes nothing
        # into run folders (no .hydra/, no job log), which dynbert owns. The folder travels in the
        # environment: as an override, Hydra's grammar would refuse a name with non-ASCII characters.
        command = [sys.executable, "-m", "dynbert.sweep", "--multirun", "--config-dir", str(conf_dir()),
                   "--config-name", "config", f"hydra.sweep.dir=${{oc.env:{_SWEEP_DIR}}}", "hydra.sweep.subdir=.",
                   "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none",
                   *search_path_overrides(), *runs]
        stopped = _run_in_own_group(command, env)
        if stopped is not None:
            break
    failed = _summarize(folder, sweep_id, run_dirs, console, stopped is not None)
    if stopped is not None:
        raise SweepInterrupted(f"sweep {'interrupted' if stopped == signal.SIGINT else 'stopped by SIGTERM'}; "
                               f"running runs saved a checkpoint and finished runs are kept in {folder}: "
                               "run the same command again to complete it", exit_code=128 + stopped)
    return folder, failed


def _run_in_own_group(command: list[str], env: dict) -> int | None:
    """Run the multirun in its own process group; pass Ctrl-C/SIGTERM on to that whole group.

    Returns the signal that stopped it, or None. The group gets SIGTERM either way: every job
    checkpoints and stops, and no job process outlives `dynbert sweep`.
    """
    process = subprocess.Popen(command, env=env, stdout=_stderr_fd(), start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):  # noqa: ARG001
        received.append(signum)
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    in_main = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if process.poll() is None:  # we are being torn down: take the jobs with us
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
    return received[0] if received else None


def _stderr_fd() -> int | None:
    """Where the jobs' output goes: stderr, so stdout holds only the sweep folder (for scripts)."""
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stderr (tests) has no file descriptor
        return None


def _statuses(folder: Path, sweep_id: str | None) -> list[dict]:
    from .rundir import STATUS_FILE

    statuses = []
    for path in sorted(folder.rglob(STATUS_FILE)):
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if status.get("sweep_id") == sweep_id:
            statuses.append(status)
    return statuses


def _summarize(folder: Path, sweep_id: str, run_dirs: list[Path], console: Console, stopped: bool) -> int:
    """Print what became of every planned run; return how many did not complete.

    A run with no status from this sweep was left to another process that held its folder (its
    status.json is that process's): complete by now, it counts as such; otherwise it is in use
    elsewhere, was never started (the sweep was stopped), or its job failed before it could report
    (its error is printed above).
    """
    from .report import format_knob
    from .rundir import RunLock, read_complete_metrics

    statuses = _statuses(folder, sweep_id)
    reported = {s["run_dir"] for s in statuses}
    for run_dir in run_dirs:
        if str(run_dir) in reported:
            continue
        row = dict(task=run_dir.parent.name, method="", knob="", seed="", run_dir=str(run_dir))
        metrics = read_complete_metrics(run_dir)
        holder = RunLock(run_dir).holder_message()
        if metrics is not None:
            row.update(status="completed by another process", score=metrics["score"],
                       flops_ratio=metrics["flops_ratio"], method=metrics["method"],
                       knob=format_knob(metrics["method"], metrics["knob"], metrics["knob_value"]),
                       seed=metrics["seed"])
        elif holder is not None:
            row.update(status="in use by another process", error=holder)
        elif stopped:
            row.update(status="interrupted", error="not started: the sweep was stopped")
        else:
            row.update(status="failed", error="no result: its job's error is printed above")
        statuses.append(row)
    names = ("done", "skipped", "failed", "interrupted", "completed by another process", "in use by another process")
    counts = {name: sum(s["status"] == name for s in statuses) for name in names}
    table = Table(title=f"sweep {folder}")
    for column in ("task", "method", "knob", "seed", "run", "status", "score", "FLOPs ratio", "note"):
        table.add_column(column)
    for s in statuses:
        table.add_row(s["task"], s["method"], s["knob"], str(s["seed"]), Path(s["run_dir"]).name,
                      s["status"], f"{s['score']:.4f}" if s.get("score") is not None else "",
                      f"{s['flops_ratio']:.3f}" if s.get("flops_ratio") is not None else "",
                      s.get("error", ""))
    print_table(console, table)
    console.print(f"done {counts['done']}, skipped (already complete) {counts['skipped']}, "
                  f"failed {counts['failed']}"
                  + "".join(f", {name} {counts[name]}" for name in names[3:] if counts[name]))
    return counts["failed"] + counts["in use by another process"]


def job(cfg: DictConfig) -> str:
    """One run of the sweep: skip it if complete, else train (resuming a checkpoint); never raise."""
    from hydra.core.hydra_config import HydraConfig

    from . import stop
    from .config import validate
    from .report import format_knob
    from .rundir import (STATUS_FILE, RunFolderBusy, RunLock, differing_keys, load_run_config,
                         read_complete_metrics, take_ownership)
    from .train import TrainingInterrupted, train

    stop.install()
    stop.end_with_parent()  # a launcher's worker process: stop when the multirun is gone
    hydra = HydraConfig.get()
    run_dir = run_folder(Path(hydra.sweep.dir), cfg, list(hydra.overrides.task))
    OmegaConf.set_struct(cfg, False)
    cfg.output_dir = str(run_dir)
    cfg.pop("hydra", None)
    status = dict(sweep_id=os.environ.get(_SWEEP_ID), task=cfg.task.name, method=cfg.method.name,
                  seed=cfg.seed, run_dir=str(run_dir))
    status["lambda"] = float(cfg["lambda"])
    knob = run_knob(cfg)
    status["knob"] = format_knob(cfg.method.name, None if knob is None else knob.key,
                                 None if knob is None else OmegaConf.select(cfg, knob.key))
    console = Console(stderr=True)
    label = f"{cfg.task.name} {run_dir.name}"
    holder = RunLock(run_dir).holder_message()
    if holder is not None:  # another process's run: write nothing there (the summary looks at it at the end)
        console.print(f"[yellow]in use[/]: {label}: {holder}")
        return "in use by another process"
    try:
        take_ownership(run_dir)
    except DynbertError as error:  # not ours: write nothing there (the summary counts it as failed)
        console.print(f"[red]failed[/]: {label}: {error}")
        return "failed"
    metrics = read_complete_metrics(run_dir)
    if metrics is not None and differing_keys(load_run_config(run_dir), cfg):
        metrics = None  # another run's result: train() refuses it and says why
    with stop.deferred():
        if metrics is not None:
            status["status"] = "skipped"
        elif stop.requested():
            status.update(status="interrupted", error="not started: the sweep was stopped")
        else:
            # Jobs start side by side (joblib, SLURM): count what has finished, not a position in a queue.
            done, total = _finished(Path(hydra.sweep.dir)), os.environ.get(_SWEEP_TOTAL, "?")
            console.print(f"[bold]start[/] ({done}/{total} finished): {label}")
            try:
                validate(cfg)
                metrics = train(cfg, console=console)
                status["status"] = "done"
            except RunFolderBusy as error:  # another process took the folder since the check above
                console.print(f"[yellow]in use[/]: {label}: {error}")
                return "in use by another process"
            except TrainingInterrupted as error:
                status.update(status="interrupted", error=first_line(error))
                console.print(f"[yellow]interrupted[/]: {label}: {status['error']}")
            except Exception as error:  # noqa: BLE001 - a failed run must not stop the others
                status.update(status="failed", error=f"{error.__class__.__name__}: {first_line(error)}")
                console.print(f"[red]failed[/]: {label}: {status['error']}")
        if metrics is not None:
            status.update(score=metrics["score"], flops_ratio=metrics["flops_ratio"])
        atomic_write_json(run_dir / STATUS_FILE, status)
    return status["status"]


def _finished(sweep_dir: Path) -> int:
    """Runs of this sweep invocation that have finished so far (for the progress line)."""
    return len(_statuses(sweep_dir, os.environ.get(_SWEEP_ID)))


def _main() -> None:
    import hydra

    from . import stop

    # This process only schedules jobs: a stop signal is recorded, the jobs see it and stop.
    stop.install()
    # `dynbert sweep` killed outright (SIGKILL, out of memory) cannot pass a stop on: then this
    # process passes it to its own group, as `dynbert sweep` would have.
    if os.environ.get(_SWEEP_PARENT):
        stop.end_with_parent(group=True, parent=int(os.environ[_SWEEP_PARENT]))
    # Hydra prints any exception as a stack trace; raised instead, a stop in progress ends quietly
    # (a launcher worker killed while it still started up: joblib's TerminatedWorkerError) and
    # `dynbert sweep`, which sent the signal, says how to resume.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        with stop.deferred():
            hydra.main(config_path=None, config_name="config", version_base=None)(job)()
    except Exception as error:
        if stop.requested() is not None:
            sys.exit(128 + stop.requested())
        if os.environ.get("DYNBERT_DEBUG"):
            raise
        print(f"error: the sweep's launcher failed: {first_line(error)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _main()
