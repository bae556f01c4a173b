"""Compose and check the run configuration from conf/ (Hydra's compose API)."""

from __future__ import annotations

import math
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import DynbertError, first_line


# The values dynbert.core accepts (a test checks they match). Not imported from there: that would
# load torch into every `dynbert sweep` and `dynbert train --cfg`, seconds before anything runs.
CHOICES = {
    "gate.score": ("attention_received", "cls_attention"),
    "gate.parametrization": ("clip", "sigmoid"),
    "gate.layer_weighting": ("linear", "none"),
    "gate.bimodal_schedule": ("hold", "constant"),
}


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
        raise DynbertError(f"bad override: {_explain(error)}") from error
    finally:
        GlobalHydra.instance().clear()
    validate(cfg)
    return cfg


def _explain(error: Exception) -> str:
    """Hydra's first line, with what to do instead of what Hydra suggests."""
    text, first = str(error), first_line(error)
    if first.startswith("Could not override") and "+" in text:
        # Hydra suggests `+key=value`, which would add a key nothing reads: a typo must fail.
        return f"{first} There is no such key: see every key with `dynbert train --cfg`."
    if "Available options in" in text:
        listed = text.split("Available options in", 1)[1].split("Config search path")[0].splitlines()[1:]
        return f"{first}; options: {', '.join(line.strip() for line in listed if line.strip())}"
    return first


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
        if not _is_int(value) or value < 1:
            raise DynbertError(f"train.{key}={value} is not valid: pass an integer >= 1")
    # A negative max_steps would train nothing and still write metrics; a string, fail mid-run.
    for key in ("max_steps", "max_train_samples", "max_eval_samples"):
        value = cfg.train[key]
        if value is not None and (not _is_int(value) or value < 1):
            raise DynbertError(f"train.{key}={value} is not valid: pass null (no limit) or an integer >= 1")
    for key in ("train.lr", "train.weight_decay", "train.warmup_ratio", "train.max_grad_norm",
                "gate.lr", "gate.start", "gate.bimodal_weight"):
        value = OmegaConf.select(cfg, key)
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise DynbertError(f"{key}={value} is not valid: pass a finite number >= 0")
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise DynbertError(f"{key}={value} is not valid: pass one of {', '.join(choices)}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
