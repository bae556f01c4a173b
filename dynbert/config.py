"""Compose and check the run configuration from conf/ (Hydra's compose API)."""

from __future__ import annotations

import math
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import DynbertError


def conf_dir() -> Path:
    """conf/ beside the package in a checkout; dynbert/conf inside an installed wheel."""
    checkout = Path(__file__).resolve().parent.parent / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    from importlib.resources import files

    return Path(str(files("dynbert.conf")))


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The resolved config for ``overrides`` (``key=value``, ``group=option``), checked."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as error:
        raise DynbertError(f"bad override: {_first_line(error)}") from error
    finally:
        GlobalHydra.instance().clear()
    validate(cfg)
    return cfg


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def validate(cfg: DictConfig) -> None:
    """Reject values that would fail later, or silently mean nothing, with one clear sentence."""
    lam = cfg["lambda"]
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise DynbertError(f"lambda={lam} is not valid: pass a finite number >= 0, e.g. lambda=0.1")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise DynbertError(f"seed={cfg.seed} is not valid: pass an integer, e.g. seed=0")
    max_length = cfg.task.max_length
    if not isinstance(max_length, int) or max_length < 8:
        raise DynbertError(f"task.max_length={max_length} is not valid: pass an integer >= 8 "
                           "(room for CLS, SEP and text)")
    layers = cfg.gate.layers
    if layers is not None and (not OmegaConf.is_list(layers)
                               or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
        raise DynbertError(f"gate.layers={layers} is not valid: pass null (every layer) or a list "
                           "of layer indices, e.g. gate.layers=[0,1,2]")
    for key in ("epochs", "batch_size", "eval_batch_size", "checkpoint_every"):
        value = cfg.train[key]
        if not isinstance(value, int) or value < 1:
            raise DynbertError(f"train.{key}={value} is not valid: pass an integer >= 1")
