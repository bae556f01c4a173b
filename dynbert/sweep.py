"""`dynbert sweep`: a Hydra multirun of `dynbert train` runs, resumable.

The CLI side (`run_sweep`) reads the sweep config, hands Hydra its overrides in a subprocess
(`python -m dynbert.sweep --multirun ...`: `@hydra.main` owns sys.argv, and Hydra's launchers,
joblib or submitit, need its own multirun machinery), then summarises. Each job (`job`) is one
`train(cfg)` in its own folder `<sweep>/<task>/<run_name>`, keyed by its values rather than a
job number, so re-running the sweep finds finished runs and skips them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from .errors import DynbertError, atomic_write_json, first_line

STATUS_FILE = "status.json"
_SWEEP_ID, _SWEEP_TOTAL = "DYNBERT_SWEEP_ID", "DYNBERT_SWEEP_TOTAL"


def _split_overrides(overrides: list[str]):
    """(plain overrides for compose, sweep overrides by key) using Hydra's own parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise DynbertError(f"bad override: {first_line(error)}") from error
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    swept = {o.get_key_element(): o.input_line for o in parsed if o.is_sweep_override()}
    return plain, swept


def _count_jobs(overrides: list[str]) -> int:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))


def plan_sweep(overrides: list[str]) -> tuple[Path, list[list[str]], DictConfig]:
    """The sweep folder and the override lists of its multiruns (the grid, then the baseline)."""
    from .config import compose_config

    plain, swept = _split_overrides(overrides)
    # Compose with every value of each swept key (the others at their first), so a bad key or value
    # fails here, before any run, not as one failed job among many.
    values = {line.split("=", 1)[0]: _values(line) for line in swept.values()}
    probe = {key: f"{key}={choices[0]}" for key, choices in values.items() if choices}
    cfg = compose_config(plain + list(probe.values()))
    for key, choices in values.items():
        for value in choices[1:]:
            compose_config(plain + list({**probe, key: f"{key}={value}"}.values()))
    user_keys = {line.split("=", 1)[0].lstrip("+~") for line in plain} | set(swept)
    folder = Path(cfg.output_dir) if "output_dir" in user_keys else Path("outputs/sweeps") / cfg.sweep.name
    passed = [line for line in plain if not line.startswith("output_dir=")]
    grid = dict(swept)
    for key, values in cfg.sweep.params.items():
        if key not in user_keys:
            grid[key] = f"{key}={values}"
    runs = [passed + list(grid.values())]
    if cfg.sweep.baseline and cfg.gate.enabled and "gate" not in user_keys:
        baseline_grid = [line for key, line in grid.items() if key != "lambda"]
        runs.append(passed + baseline_grid + ["gate=none", "lambda=0"])
    return folder, runs, cfg


def _values(line: str) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_overrides([line])[0]
    return [str(value) for value in override.sweep_iterator()]


def run_sweep(overrides: list[str], console: Console) -> tuple[Path, int]:
    """Run every job of the sweep not already complete; print a summary; return (folder, failed)."""
    folder, multiruns, _ = plan_sweep(overrides)
    sweep_id = f"{time.time_ns()}"
    total = sum(_count_jobs(runs) for runs in multiruns)
    console.print(f"sweep: {total} runs into {folder}")
    from .config import conf_dir

    env = dict(os.environ, **{_SWEEP_ID: sweep_id, _SWEEP_TOTAL: str(total)})
    for runs in multiruns:
        command = [sys.executable, "-m", "dynbert.sweep", "--multirun", "--config-dir", str(conf_dir()),
                   "--config-name", "config", f"hydra.sweep.dir={folder}",
                   "hydra.sweep.subdir=${task.name}/${run_name}", *runs]
        try:
            subprocess.run(command, env=env, check=False, stdout=_stderr_fd())
        except KeyboardInterrupt:
            raise DynbertError(f"sweep interrupted; finished runs are kept in {folder}: "
                               "run the same command again to complete it") from None
    return folder, _summarize(folder, sweep_id, total, console)


def _stderr_fd() -> int | None:
    """Where the jobs' output goes: stderr, so stdout holds only the sweep folder (for scripts)."""
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stderr (tests) has no file descriptor
        return None


def _summarize(folder: Path, sweep_id: str, total: int, console: Console) -> int:
    statuses = []
    for path in sorted(folder.rglob(STATUS_FILE)):
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if status.get("sweep_id") == sweep_id:
            statuses.append(status)
    counts = {name: sum(s["status"] == name for s in statuses) for name in ("done", "skipped", "failed")}
    missing = total - len(statuses)
    table = Table(title=f"sweep {folder}")
    for column in ("task", "λ", "gate", "seed", "status", "score", "FLOPs ratio", "note"):
        table.add_column(column)
    for s in statuses:
        table.add_row(s["task"], f"{s['lambda']:g}", s["gate"], str(s["seed"]), s["status"],
                      f"{s['score']:.4f}" if s.get("score") is not None else "",
                      f"{s['flops_ratio']:.3f}" if s.get("flops_ratio") is not None else "",
                      s.get("error", ""))
    console.print(table)
    console.print(f"done {counts['done']}, skipped (already complete) {counts['skipped']}, "
                  f"failed {counts['failed']}" + (f", did not report {missing}" if missing > 0 else ""))
    return counts["failed"] + max(missing, 0)


def job(cfg: DictConfig) -> str:
    """One run of the sweep: skip it if complete, else train (resuming a checkpoint); never raise."""
    from hydra.core.hydra_config import HydraConfig

    from .config import validate
    from .train import read_complete_metrics, train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    OmegaConf.set_struct(cfg, False)
    cfg.output_dir = str(run_dir)
    cfg.pop("hydra", None)
    status = dict(sweep_id=os.environ.get(_SWEEP_ID), task=cfg.task.name, gate=cfg.gate.name,
                  seed=cfg.seed, run_dir=str(run_dir))
    status["lambda"] = float(cfg["lambda"])
    console = Console(stderr=True)
    label = f"{cfg.task.name} λ={cfg['lambda']:g} gate={cfg.gate.name} seed={cfg.seed}"
    metrics = read_complete_metrics(run_dir)
    if metrics is not None:
        status["status"] = "skipped"
    else:
        console.print(f"[bold]run {_finished(run_dir) + 1}/{os.environ.get(_SWEEP_TOTAL, '?')}[/]: {label}")
        try:
            validate(cfg)
            metrics = train(cfg, console=console)
            status["status"] = "done"
        except Exception as error:  # noqa: BLE001 - a failed run must not stop the others
            status.update(status="failed", error=f"{error.__class__.__name__}: {first_line(error)}")
            console.print(f"[red]failed[/]: {label}: {status['error']}")
    if metrics is not None:
        status.update(score=metrics["score"], flops_ratio=metrics["flops_ratio"])
    atomic_write_json(run_dir / STATUS_FILE, status)
    return status["status"]


def _finished(run_dir: Path) -> int:
    """Runs of this sweep invocation that have finished so far (for the progress line)."""
    sweep_id, count = os.environ.get(_SWEEP_ID), 0
    for path in run_dir.parent.parent.rglob(STATUS_FILE):
        try:
            count += json.loads(path.read_text()).get("sweep_id") == sweep_id
        except (OSError, ValueError):
            pass
    return count


def _main() -> None:
    import hydra

    hydra.main(config_path=None, config_name="config", version_base=None)(job)()


if __name__ == "__main__":
    _main()
