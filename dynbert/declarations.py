"""What conf/ declares about each method, read without torch: its class, its knob, its keys.

A method is a class registered in ``dynbert.methods`` and a YAML, ``method/<name>.yaml``, in conf/ or
in a folder of ``DYNBERT_CONFIG_PATH`` (a method kept outside dynbert). The YAML names the class
(``class:``, a dotted path), its knob (``knob: {key, off_at, label}``: the key that trades accuracy for
FLOPs, the value at which it prunes least, its label in tables and plots), the knob's values a sweep
tries (``grid``, a list) and the defaults of the class's arguments. `dynbert report` reads it here by
the method's name, also for run folders written before methods had one: the YAML, not the folder,
says what a method's knob is.

A run's knob is its method's, or ``TARGET`` when it asks for a FLOPs ratio (``method.target``), and
its folder is named after it (the ``knob`` resolver below, in conf/config.yaml's ``run_name``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIG_PATH_ENV = "DYNBERT_CONFIG_PATH"
"""Folders (separated as in PATH) searched after conf/ for config groups: a method's YAML kept outside dynbert."""


def conf_dir() -> Path:
    """conf/ beside the package in a checkout; dynbert/conf inside an installed wheel."""
    checkout = Path(__file__).resolve().parent.parent / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    from importlib.resources import files

    return Path(str(files("dynbert.conf")))


def extra_config_dirs() -> list[Path]:
    """The folders of ``DYNBERT_CONFIG_PATH``, in order."""
    return [Path(part).expanduser() for part in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if part]


def method_declaration(name: str) -> DictConfig | None:
    """``method/<name>.yaml`` as written (unresolved), from conf/ or the first extra folder holding one;
    None when no folder does (a method whose YAML is gone: its runs still load, by name)."""
    for folder in [conf_dir(), *extra_config_dirs()]:
        path = folder / "method" / f"{name}.yaml"
        if path.is_file():
            return _load(str(path), path.stat().st_mtime_ns)
    return None


@functools.lru_cache(maxsize=64)
def _load(path: str, mtime_ns: int) -> DictConfig:  # noqa: ARG001 - the cache key: an edited file is read again
    return OmegaConf.load(path)


def method_names() -> list[str]:
    """Every method a YAML declares, in conf/ and the extra folders."""
    return sorted({path.stem for folder in [conf_dir(), *extra_config_dirs()]
                   for path in (folder / "method").glob("*.yaml")})


def default_method() -> str:
    """The method conf/config.yaml trains by default: the paper's gates, what the baseline is set beside."""
    for entry in OmegaConf.load(conf_dir() / "config.yaml").defaults:
        if isinstance(entry, DictConfig) and "method" in entry:
            return entry.method
    raise AssertionError("conf/config.yaml names no default method")


@dataclass(frozen=True)
class Knob:
    """What trades accuracy for FLOPs in a run: a config key, as a method's YAML declares it."""

    key: str
    """The config key: ``lambda`` (top level, the sparsity weight λ), ``method.keep``, ``method.target``."""
    off_at: float | None
    """The value at which it prunes least, where "Δ vs knob off" is measured from; None: no such value."""
    label: str
    """Its name in tables and plot labels (λ, keep, target)."""

    @property
    def folder(self) -> str:
        """Its name in run folders: the key's last part (``gates-lambda0.1``, ``topk-keep0.5``)."""
        return self.key.rpartition(".")[2]

    def active(self, value) -> bool:
        """Whether a run at ``value`` asked for pruning at all (λ > 0, keep < 1, any target)."""
        return self.off_at is None or value != self.off_at


TARGET = Knob("method.target", off_at=None, label="target")
"""A FLOPs ratio to reach (``methods/target.py``): a run that sets one varies it, not its method's knob."""
BASELINE_FOLDER_KEY = "lambda"
"""A method without a knob (the un-pruned baseline) names its folder after λ, as every run did before
there were knobs: `dynbert sweep` passes it λ = 0, so its folders stay ``none-lambda0-seed0``."""


def method_knob(method_cfg: DictConfig) -> Knob | None:
    """The knob a method's YAML declares; None for a method that prunes nothing."""
    block = method_cfg.get("knob")
    return None if block is None else Knob(str(block.key), block.get("off_at"), str(block.label))


def run_knob(cfg: DictConfig) -> Knob | None:
    """The knob a run varies: ``TARGET`` when it sets ``method.target``, else its method's."""
    if OmegaConf.select(cfg, "method.target") is not None:
        return TARGET
    return method_knob(cfg.method)


def knob_active(cfg: DictConfig) -> bool:
    """Whether the run asked for pruning at all: its knob away from ``off_at`` (λ > 0, keep < 1), or a target."""
    knob = run_knob(cfg)
    return knob is not None and knob.active(OmegaConf.select(cfg, knob.key))


def folder_keys(cfg: DictConfig) -> set[str]:
    """The keys a run folder's name shows: ``<task>/<method>-<knob><value>-seed<seed>``."""
    knob = run_knob(cfg)
    return {"task", "method", "seed", BASELINE_FOLDER_KEY if knob is None else knob.key}


def _folder_knob(*, _root_: DictConfig) -> str:
    knob = run_knob(_root_)
    key, name = (BASELINE_FOLDER_KEY, BASELINE_FOLDER_KEY) if knob is None else (knob.key, knob.folder)
    return f"{name}{OmegaConf.select(_root_, key)}"


# conf/config.yaml: `run_name: ${method.name}-${knob:}-seed${seed}` gives gates-lambda0.1-seed0,
# gates-target0.5-seed0, topk-keep0.5-seed0, none-lambda0-seed0.
OmegaConf.register_new_resolver("knob", _folder_knob, replace=True)
