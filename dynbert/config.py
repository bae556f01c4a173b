"""Compose and check the run configuration from conf/ (Hydra's compose API)."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .checks import (LAMBDA_MAX, check_bool, check_choice, check_non_negative, check_positive, is_int,
                     is_number)
from .declarations import conf_dir, extra_config_dirs, method_knob
from .errors import DynbertError, check_writable_folder, first_line

CHOICES = {"train.device": ("auto", "cpu", "cuda", "mps"), "train.precision": ("fp32", "bf16", "fp16")}
"""The engine's keys with a fixed set of values (a method checks its own: ``TokenPruner.check``)."""
SEED_RANGE = (0, 2**32 - 1)
"""Seeds numpy and torch both accept."""
TINY_MODEL_SIZES = ("model.hidden_size", "model.num_layers", "model.num_heads", "model.intermediate_size",
                    "model.vocab_size")
"""The sizes of the tiny model built from scratch (model=tiny only)."""


def expand_home(overrides) -> list[str]:
    """``key=~/x`` as a shell would have written it: ``key=/home/me/x``.

    Hydra's override grammar rejects an unquoted ``~`` in a value (and a quoted one stays ``~``);
    the shell only expands ``~`` after ``=`` in variable assignments, which ``task.data_dir=`` is not.
    """
    expanded = []
    for line in overrides:
        key, sep, value = line.partition("=")
        if sep and not key.startswith("~") and value.startswith("~"):
            line = f"{key}={os.path.expanduser(value)}"
        expanded.append(line)
    return expanded


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The resolved config for ``overrides`` (``key=value``, ``group=option``), checked."""
    overrides = expand_home(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = compose(config_name="config", overrides=[*search_path_overrides(), *overrides])
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as error:
        raise DynbertError(f"bad override: {_explain(error)}") from error
    finally:
        GlobalHydra.instance().clear()
    validate(cfg)
    _check_lambda_given(cfg, overrides)
    return cfg


def search_path_overrides() -> list[str]:
    """Hydra's override adding the folders of ``DYNBERT_CONFIG_PATH`` to conf/ (a method's YAML kept
    outside dynbert); none without it."""
    folders = extra_config_dirs()
    if not folders:
        return []
    return ["hydra.searchpath=[" + ",".join(f"file://{folder.resolve()}" for folder in folders) + "]"]


def _check_lambda_given(cfg: DictConfig, overrides: list[str]) -> None:
    """A λ the user passed to a method whose knob is not λ would be ignored (top-k and random read
    method.keep) or only rename the folder (the baseline): one sentence instead. λ from conf/ (the
    default 0.1, an experiment's) is not the user's choice; the baseline's λ = 0, what `dynbert sweep`
    passes it, means what the baseline does."""
    if not any(line.partition("=")[0].lstrip("+~") == "lambda" for line in overrides):
        return
    if cfg.method.get("target") is not None:
        raise DynbertError(f"lambda={cfg['lambda']} was given with method.target={cfg.method.target}, which "
                           "learns λ itself (the multiplier that holds the FLOPs ratio there): drop one of them")
    knob, lam, name = method_knob(cfg.method), cfg["lambda"], cfg.method.name
    if (knob is not None and knob.key == "lambda") or (knob is None and lam == 0):
        return
    if knob is None:
        raise DynbertError(f"lambda={lam} was given, but method={name} prunes nothing and does not read it: "
                           "drop lambda (or pass lambda=0)")
    raise DynbertError(f"lambda={lam} was given, but method={name} does not read it: its knob is {knob.key}, "
                       f"e.g. {knob.key}=0.5; drop lambda")


def _explain(error: Exception) -> str:
    """Hydra's first line, with what to do instead of what Hydra suggests."""
    text, first = str(error), first_line(error)
    if first.startswith("Could not override") and "+" in text:
        # Hydra suggests `+key=value`, which would add a key nothing reads: a typo must fail.
        return f"{first} There is no such key: see every key with `dynbert train --cfg`."
    if "missing EQUAL" in text:  # a word alone (`dynbert train job`): Hydra names only its grammar
        return f"{first}: an override is key=value or group=option, e.g. lambda=0.1 or task=sst2"
    if "LexerNoViableAltException" in text:  # non-ASCII and some other characters must be quoted
        key, _, value = first.partition(": ")[2].partition("=")
        return f"{first}: quote a value that holds non-ASCII or special characters, e.g. {key}='{value}'"
    if "Available options in" in text:
        listed = text.split("Available options in", 1)[1].split("Config search path")[0].splitlines()[1:]
        return f"{first}; options: {', '.join(line.strip() for line in listed if line.strip())}"
    return first


def validate(cfg: DictConfig) -> None:
    """Reject values that would fail later, or silently mean nothing, with one clear sentence: the
    engine's keys here, the method's own keys by its class (``TokenPruner.check``)."""
    lam = cfg["lambda"]
    if not is_number(lam) or not 0 <= lam <= LAMBDA_MAX:
        raise DynbertError(f"lambda={lam} is not valid: pass a number from 0 to {LAMBDA_MAX:g}, e.g. lambda=0.1 "
                           "(it weighs the pruning loss against the task loss, about 1; every method's grid "
                           "stops at 1 or below)")
    if not is_int(cfg.seed) or not SEED_RANGE[0] <= cfg.seed <= SEED_RANGE[1]:
        raise DynbertError(f"seed={cfg.seed} is not valid: pass an integer from {SEED_RANGE[0]} to "
                           f"{SEED_RANGE[1]}, e.g. seed=0")
    _check_output_dir(cfg.output_dir)
    max_length = cfg.task.max_length
    if not isinstance(max_length, int) or max_length < 8:
        raise DynbertError(f"task.max_length={max_length} is not valid: pass an integer >= 8 "
                           "(room for CLS, SEP and text)")
    layers = cfg.method.get("layers")
    if layers is not None and (not OmegaConf.is_list(layers) or not layers
                               or not all(is_int(i) for i in layers)):
        raise DynbertError(f"method.layers={layers} is not valid: pass null (every layer) or a non-empty list "
                           "of layer indices, e.g. method.layers=[0,1,2] (method=none prunes nothing)")
    target = cfg.method.get("target")
    if target is not None and (not is_number(target) or not 0 < target < 1):
        raise DynbertError(f"method.target={target} is not valid: pass the FLOPs ratio to reach, a number in "
                           "(0, 1) (0.5 = 2x fewer FLOPs), or null to use lambda")
    for key in ("epochs", "batch_size", "eval_batch_size", "checkpoint_every", "gradient_accumulation_steps"):
        value = cfg.train[key]
        if not is_int(value) or value < 1:
            raise DynbertError(f"train.{key}={value} is not valid: pass an integer >= 1")
    # A negative max_steps would train nothing and still write metrics; a string, fail mid-run. One
    # evaluation example has no correlation (STS-B, CoLA) and would fail after the whole training.
    for key, least in (("max_steps", 1), ("max_train_samples", 1), ("max_eval_samples", 2)):
        value = cfg.train[key]
        if value is not None and (not is_int(value) or value < least):
            raise DynbertError(f"train.{key}={value} is not valid: pass null (no limit) or an integer >= {least}")
    check_non_negative(cfg, "train.lr", "train.weight_decay", "train.warmup_ratio", "train.max_grad_norm")
    warmup = cfg.train.warmup_ratio
    if warmup > 1:
        raise DynbertError(f"train.warmup_ratio={warmup} is not valid: pass the fraction of training over which "
                           "the learning rate warms up, a number in [0, 1]")
    distill = cfg.train.distill
    if not is_number(distill) or not 0 <= distill <= 1:
        raise DynbertError(f"train.distill={distill} is not valid: pass the weight of distillation, a number in [0, 1]")
    check_positive(cfg, "train.distill_temperature")
    threads = cfg.train.num_threads
    if threads is not None and (not is_int(threads) or threads < 1):
        raise DynbertError(f"train.num_threads={threads} is not valid: pass null (torch's default) or an integer >= 1")
    for key in TINY_MODEL_SIZES:
        value = OmegaConf.select(cfg, key, default=1)
        if not is_int(value) or value < 1:
            raise DynbertError(f"{key}={value} is not valid: pass an integer >= 1")
    heads = OmegaConf.select(cfg, "model.num_heads")
    if heads is not None and cfg.model.hidden_size % heads:
        raise DynbertError(f"model.num_heads={heads} is not valid: model.hidden_size={cfg.model.hidden_size} must "
                           "split evenly into the heads, e.g. model.num_heads=4")
    check_bool(cfg, "train.group_by_length", "method.mask_attention", "train.overwrite", "sweep.baseline")
    family = OmegaConf.select(cfg, "model.family", default=None)
    if family is not None:
        from .encoders import supported_model_types  # the families registered, not a copied list

        if family not in supported_model_types():
            raise DynbertError(f"model.family={family} is not valid: pass one of {', '.join(supported_model_types())}")
    for key, choices in CHOICES.items():
        check_choice(cfg, key, choices)
    _check_method(cfg)


def _check_method(cfg: DictConfig) -> None:
    """The method's declaration (its YAML's knob and grid, ``declarations.py``), then its own keys."""
    from .methods import method_class  # the registered classes, not a copied list (as the families above)

    block, grid = cfg.method.get("knob"), cfg.method.get("grid")
    if block is not None and not (OmegaConf.is_dict(block) and {"key", "off_at", "label"} <= set(block)
                                  and OmegaConf.select(cfg, str(block.key), default=_MISSING) is not _MISSING):
        raise DynbertError(f"method.knob={block} is not valid: a method's YAML declares its knob as a key of the "
                           "config, the value that prunes least and a label, e.g. {key: lambda, off_at: 0, label: λ}")
    if block is None and grid is not None:
        raise DynbertError(f"method.grid={grid} is not valid: method={cfg.method.name} has no knob to vary; "
                           "pass method.grid=null")
    if block is not None and not (OmegaConf.is_list(grid) and grid):
        raise DynbertError(f"method.grid={grid} is not valid: pass the values of the method's knob "
                           f"({block.key}) a sweep tries, as a list, e.g. method.grid=[0,0.1,1]")
    method_class(cfg.method).check(cfg)


_MISSING = object()


def _check_output_dir(value) -> None:
    """A run folder that can be created, or one sentence on why ``output_dir=value`` cannot be one."""
    if value is None or not str(value).strip():
        raise DynbertError(f"output_dir is empty ({'null' if value is None else repr(value)}): pass a folder for the run, e.g. "
                           "output_dir=outputs/runs/my-run (an unset shell variable gives an empty value)")
    check_writable_folder(Path(str(value)).expanduser(), "output_dir=")
