"""The run folder: what dynbert writes there, what it may delete, who may write, and its schema.

A run folder is a contract (README, "The run folder"). dynbert only ever deletes what it can prove
it wrote: a folder is dynbert's when it holds ``OWNER_FILE`` (written when dynbert created the
folder or found it empty), and even then only the names in ``OWNED_NAMES`` are removed. A folder
that holds anything else and no owner file is refused, never cleaned.

One process at a time writes a run folder: ``RunLock`` holds ``LOCK_FILE`` (pid, host, SLURM job)
for the whole run; a second process is told who holds it; a dead holder's lock is taken over.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .declarations import method_declaration, method_knob
from .errors import DynbertError, atomic_write_bytes, atomic_write_json, atomic_write_text

CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, LOG_FILE = "config.yaml", "metrics.json", "checkpoint.pt", "train.log"
MODEL_DIR, STATUS_FILE = "model", "status.json"
CHECKPOINT_SUM_FILE = CHECKPOINT_FILE + ".sha256"
"""checkpoint.pt's sha256, as `sha256sum` writes it: what load_checkpoint checks the file against."""
OWNER_FILE, LOCK_FILE = ".dynbert-run", ".dynbert-lock"
OWNED_NAMES = (METRICS_FILE, CHECKPOINT_FILE, CHECKPOINT_SUM_FILE, LOG_FILE, MODEL_DIR, STATUS_FILE)
"""What a fresh start removes from a folder that dynbert owns (config.yaml is rewritten)."""

NOT_IDENTITY = ("train.overwrite", "train.num_threads", "train.device", "output_dir", "sweep",
                "glue_dir", "task.data_dir", "run_name", "method.class", "method.knob", "method.grid")
"""Config keys that never make two runs different results: how a run was executed, where its data lay
(paths differ between machines), names derived from other keys, and the method's declaration (its
class, its knob and the grid a sweep would try: what it is, not how this run was set)."""

# ---------------------------------------------------------------------------------------------
# metrics.json: one schema for train (writer), report and sweep (readers) and the tests.

_NUMBER = (int, float)
METRICS_SCHEMA: dict[str, type | tuple] = {
    "task": str, "lambda": _NUMBER, "seed": int, "baseline": bool, "metric": str, "score": _NUMBER,
    "score_soft": _NUMBER, "metrics": dict, "flops_per_example": _NUMBER,
    "baseline_flops_per_example": _NUMBER, "flops_ratio": _NUMBER, "kept_per_layer": list,
    "train_seconds": _NUMBER, "version": object,
}
"""Keys every finished run's metrics.json holds, with the type each must have."""
_POSITIVE = ("flops_per_example", "baseline_flops_per_example", "flops_ratio")
_SCORES = ("score", "score_soft")
"""Every GLUE metric (accuracy, F1, Matthews and rank correlations) lies in [-1, 1]."""
_OPTIONAL_FRACTIONS = ("cue_kept", "hard_soft_agreement")
MAX_FLOPS = 1e18
"""A million times BERT-large on 512 tokens (3.4e11 FLOPs): a count past it is damage, and the report's mean
over seeds of counts below it stays finite."""


def metrics_problem(data) -> str | None:
    """Why a parsed metrics.json cannot be used (one phrase), or None if it can.

    Beyond types: numbers must be finite, scores in [-1, 1], FLOPs positive and below ``MAX_FLOPS``, the
    FLOPs ratio at most 1 (pruning never adds work), λ >= 0, kept fractions in [0, 1]. A file that breaks
    these was not written by a healthy run, and averaging it would show a wrong result (1e308 twice is inf).
    """
    if not isinstance(data, dict):
        return f"top level is a JSON {type(data).__name__}, not an object"
    missing = [key for key in METRICS_SCHEMA if key not in data]
    if missing:
        return "missing keys: " + ", ".join(missing)
    for key, kind in METRICS_SCHEMA.items():
        value = data[key]
        if (isinstance(value, bool) and kind is not bool and kind is not object) or not isinstance(value, kind):
            expected = "a number" if kind is _NUMBER else kind.__name__
            return f"'{key}' is {json.dumps(value)[:40]}, expected {expected}"
        if kind is _NUMBER and not math.isfinite(value):
            return f"'{key}' is {value}, expected a finite number"
    for key in _POSITIVE:
        if data[key] <= 0:
            return f"'{key}' is {data[key]}, expected a number > 0"
    for key in _SCORES:
        if not -1 <= data[key] <= 1:
            return f"'{key}' is {data[key]}, expected a metric in [-1, 1]"
    for key in ("flops_per_example", "baseline_flops_per_example"):
        if data[key] > MAX_FLOPS:
            return f"'{key}' is {data[key]}, expected a FLOPs count below {MAX_FLOPS:g}"
    if data["flops_ratio"] > 1:
        return f"'flops_ratio' is {data['flops_ratio']}, expected at most 1 (pruning never adds work)"
    if data["lambda"] < 0:
        return f"'lambda' is {data['lambda']}, expected a number >= 0"
    kept = data["kept_per_layer"]
    if not all(isinstance(v, _NUMBER) and not isinstance(v, bool) and 0 <= v <= 1 for v in kept):
        return "'kept_per_layer' must be a list of fractions in [0, 1]"
    for key in _OPTIONAL_FRACTIONS:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, _NUMBER) or not 0 <= value <= 1):
            return f"'{key}' is {json.dumps(value)[:40]}, expected a fraction in [0, 1] or null"
    # Optional (older files lack them): the method, and its knob (e.g. "method.keep") with its value.
    for key in ("method", "knob"):
        if data.get(key) is not None and not isinstance(data[key], str):
            return f"'{key}' is {json.dumps(data[key])[:40]}, expected a string or null"
    value = data.get("knob_value")
    if data.get("knob") is not None and (isinstance(value, bool) or not isinstance(value, _NUMBER)
                                         or not math.isfinite(value)):
        return f"'knob_value' is {json.dumps(value)[:40]}, expected the finite number its knob was set to"
    return None


BEFORE_METHODS = {False: ("gates", "lambda"), True: ("none", None)}
"""``baseline`` -> (``method``, ``knob``) of a metrics.json written before dynbert had several methods, which
records neither: such a run is the paper's gates swept over λ, or the un-pruned baseline."""


def read_metrics(run_dir: Path) -> tuple[dict | None, str | None]:
    """(metrics, None) for a usable metrics.json, its ``method`` and ``knob`` filled in where it predates them
    (``BEFORE_METHODS``); (None, why) otherwise; (None, None) when absent."""
    path = Path(run_dir) / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as error:
        return None, f"cannot be read ({error.__class__.__name__})"
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as error:
        return None, f"not valid JSON ({str(error)[:80]})"
    why = metrics_problem(data)
    if why:
        return None, why
    method, knob = BEFORE_METHODS[data["baseline"]]
    data.setdefault("method", method)
    if "knob" not in data:
        data["knob"], data["knob_value"] = knob, None if knob is None else data["lambda"]
    return data, None


def _refuse_constant(name: str):
    raise ValueError(f"holds {name}, which is not a number JSON allows")


def read_complete_metrics(run_dir: Path) -> dict | None:
    """The run's metrics.json if it is complete and sane, else None (missing, corrupt or partial)."""
    return read_metrics(run_dir)[0]


# ---------------------------------------------------------------------------------------------
# Ownership


def is_owned(run_dir: Path) -> bool:
    return (run_dir / OWNER_FILE).is_file()


def foreign_entries(run_dir: Path) -> list[str]:
    """What a folder without an owner file holds (the lock aside): dynbert did not write it."""
    if not run_dir.is_dir() or is_owned(run_dir):
        return []
    return sorted(entry.name for entry in run_dir.iterdir() if entry.name != LOCK_FILE)


def refuse_foreign(run_dir: Path) -> None:
    """One sentence, and nothing written, when ``run_dir`` holds files that dynbert did not write."""
    foreign = foreign_entries(run_dir)
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DynbertError(f"output_dir {run_dir} already holds files that dynbert did not write ({listed}); "
                           "pass a new or empty folder: dynbert never writes into or cleans a folder it does not own")


def take_ownership(run_dir: Path) -> None:
    """Mark a folder that dynbert created, or found empty, as a dynbert run folder."""
    refuse_foreign(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not is_owned(run_dir):
        atomic_write_json(run_dir / OWNER_FILE, {"run_id": uuid.uuid4().hex, "created": time.time()})


def remove_owned_outputs(run_dir: Path) -> None:
    """Delete what an earlier run in this (owned) folder wrote, so a fresh start cannot mix with it."""
    if not is_owned(run_dir):
        raise AssertionError(f"refusing to clean {run_dir}: dynbert does not own it")
    for name in OWNED_NAMES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Lock


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
            "slurm_job": os.environ.get("SLURM_JOB_ID")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _stale(holder: dict) -> bool:
    """A lock whose holder cannot be running any more: a dead pid on this host, or our own
    SLURM job requeued (possibly on another node)."""
    if holder.get("slurm_job") and holder.get("slurm_job") == os.environ.get("SLURM_JOB_ID"):
        return True
    return holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1)))


class RunFolderBusy(DynbertError):
    """Another live process holds the run folder: it is that process's to write, not ours."""


class RunLock:
    """Exclusive use of a run folder for one process (a context manager)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        refuse_foreign(self.path.parent)  # the lock is the first thing written into the folder
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self._read()
                if holder is None or not _stale(holder):
                    raise RunFolderBusy(self._busy_message(holder)) from None
                # Take a dead holder's lock: rename it away (atomic: of two takers only one renames
                # it), then create ours; the loser finds our fresh lock next time round.
                try:
                    os.rename(self.path, self.path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}"))
                except FileNotFoundError:
                    pass
                for stale in self.path.parent.glob(f"{LOCK_FILE}.stale-*"):
                    stale.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(_holder(), handle)
            self.held = True
            return
        raise RunFolderBusy(self._busy_message(self._read()))

    def holder_message(self) -> str | None:
        """Which live process holds the folder, as a sentence; None when none does (or its holder is gone)."""
        holder = self._read()
        if holder is None or (holder and _stale(holder)):
            return None
        return self._busy_message(holder)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a holder that is creating it right now, or garbage

    def _busy_message(self, holder: dict | None) -> str:
        folder = self.path.parent
        if not holder:
            return (f"run folder {folder} is locked ({self.path.name} is unreadable): if no dynbert "
                    f"process uses it, delete {self.path} and run again")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
        return (f"run folder {folder} is in use by process {holder.get('pid')} on {holder.get('host')} "
                f"(since {since}): wait for it to finish, pass another output_dir, or, if that process "
                f"is gone, delete {self.path}")


# ---------------------------------------------------------------------------------------------
# config.yaml: the run's identity


def claim(run_dir: Path, cfg: DictConfig) -> None:
    """Make ``run_dir`` this run's folder (it must be locked by the caller).

    A folder holding the same run (same config but for execution keys) is resumed as it is. One
    holding another run's progress (a checkpoint or metrics) is refused unless train.overwrite. A
    dynbert folder with no progress (a run that failed early) is cleaned and reused, so the
    corrected command just works. Only dynbert's own outputs are ever deleted.
    """
    take_ownership(run_dir)
    config_path = run_dir / CONFIG_FILE
    has_progress = any((run_dir / name).is_file() for name in (METRICS_FILE, CHECKPOINT_FILE))
    if config_path.is_file() and has_progress and not cfg.train.overwrite:
        try:
            previous = OmegaConf.load(config_path)
        except Exception as error:  # noqa: BLE001 - any unreadable YAML
            raise DynbertError(f"{config_path} is unreadable ({error.__class__.__name__}); pass "
                               "train.overwrite=true to start over in that folder") from error
        differ = differing_keys(previous, cfg)
        if differ:
            raise DynbertError(f"{run_dir} holds another run (differs in {', '.join(differ[:6])}); "
                               "pass train.overwrite=true to start over, or another output_dir")
    else:
        remove_owned_outputs(run_dir)
    atomic_write_text(config_path, OmegaConf.to_yaml(cfg))


def run_identity(cfg: DictConfig) -> dict[str, str]:
    """What makes a run the result it is: its config's keys, flattened, each with its value as text
    (``value_text``: 1 and 1.0 are one value). The one definition of "the same run", for resuming a
    folder (``differing_keys``), skipping a sweep's finished job, naming a sweep's run folders and
    grouping runs in `dynbert report`.

    Left out: ``NOT_IDENTITY``; the ``method.*`` keys the run's method does not declare (an
    experiment's ``method.start`` lands on the baseline too, which never reads it); λ where the method's
    knob is not λ (top-k reads ``method.keep``, the baseline prunes nothing). A method whose YAML is
    gone keeps every key. Values are read unresolved: a run folder's config.yaml may hold interpolations
    (``${model.lr}``, resolvers of an older dynbert) that are compared as written.
    """
    flat = _flatten(OmegaConf.to_container(cfg, resolve=False))
    declaration = method_declaration(str(flat.get("method.name")))
    declared = None if declaration is None else set(declaration)
    knob = None if declaration is None else method_knob(declaration)
    reads_lambda = declaration is None or (knob is not None and knob.key == "lambda")
    return {key: value_text(value) for key, value in flat.items()
            if not ignored(key)
            and not (declared is not None and key.startswith("method.") and key.split(".")[1] not in declared)
            and (key != "lambda" or reads_lambda)}


def ignored(key: str) -> bool:
    """Whether a config key (or a group of them, ``sweep``) is in ``NOT_IDENTITY``."""
    return any(key == name or key.startswith(name + ".") for name in NOT_IDENTITY)


def differing_keys(old: DictConfig, new: DictConfig) -> list[str]:
    """The keys whose values make two run configs different runs (``run_identity``); a key one lacks
    counts as null there, as a key added to conf/ since is null where it means nothing."""
    before, after = run_identity(old), run_identity(new)
    return sorted(key for key in set(before) | set(after) if before.get(key, "null") != after.get(key, "null"))


def value_text(value) -> str:
    """A config value as text; equal values give equal text (1 and 1.0 are one value)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def load_run_config(run_dir: Path) -> DictConfig:
    """config.yaml of a run folder that `dynbert train` wrote, or one sentence on why not."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / CONFIG_FILE).is_file():
        raise DynbertError(f"{run_dir} is not a run folder (no {CONFIG_FILE}): pass a folder "
                           "that `dynbert train` wrote")
    try:
        cfg = OmegaConf.load(run_dir / CONFIG_FILE)
        cfg.method, cfg.task.max_length  # noqa: B018 - a dynbert config has both
    except Exception as error:  # noqa: BLE001 - not YAML, or not a dynbert config
        raise DynbertError(f"{run_dir / CONFIG_FILE} is not a dynbert run config "
                           f"({error.__class__.__name__}): pass a folder that `dynbert train` wrote") from error
    return cfg


# ---------------------------------------------------------------------------------------------
# Checksums: a weight file damaged on disk (a bad sector, a half-finished copy) can still parse
# and then yields NaN or wrong predictions with exit 0; its sha256, recorded when it was saved,
# tells. The manifests are in `sha256sum` format, so `sha256sum -c` checks them too.


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_checksums(manifest: Path, paths: list[Path]) -> None:
    """Record the sha256 of each of ``paths`` (files in ``manifest``'s folder), after they are written."""
    atomic_write_text(manifest, "".join(f"{sha256_file(path)}  {path.name}\n" for path in paths))


def checksum_problem(manifest: Path, paths: list[Path]) -> tuple[Path, str] | None:
    """The first of ``paths`` whose bytes are not the ones ``manifest`` recorded, and why; None when all are.

    A file the manifest does not name (or an unreadable manifest) counts as not matching: nothing
    vouches for it.
    """
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    recorded = {name: digest for digest, name in (line.split("  ", 1) for line in lines if "  " in line)}
    for path in paths:
        if path.name not in recorded:
            return path, f"{manifest.name} beside it records no sha256 for it"
        if sha256_file(path) != recorded[path.name]:
            return path, f"its sha256 differs from the one recorded in {manifest.name} when it was saved"
    return None


# ---------------------------------------------------------------------------------------------
# Checkpoints: state dicts only, loaded with weights_only=True (nothing is unpickled).


def save_checkpoint(path: Path, state: dict) -> None:
    import torch  # here, not at the top: `dynbert report` reads run folders without loading torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    # The old sum goes first: a process killed between the two writes leaves a checkpoint with no
    # sum (loaded unchecked, as an older run's) rather than a new checkpoint with the old one's sum.
    sums = path.with_name(CHECKPOINT_SUM_FILE)
    sums.unlink(missing_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    write_checksums(sums, [path])


def load_checkpoint(path: Path) -> dict:
    import torch

    sums = path.with_name(CHECKPOINT_SUM_FILE)
    # No sum: a checkpoint of an older dynbert, or one whose process died before writing it.
    problem = checksum_problem(sums, [path]) if sums.is_file() else None
    if problem is not None:
        raise DynbertError(f"{path} is not a usable checkpoint ({problem[1]}); delete it to restart this run, "
                           "or pass train.overwrite=true")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - truncated, foreign or corrupt: all unusable
        raise DynbertError(f"{path} is not a usable checkpoint ({error.__class__.__name__}); delete it "
                           "to restart this run, or pass train.overwrite=true") from error
