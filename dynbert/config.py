"""Compose and check the run configuration from conf/ (Hydra's compose API)."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import DynbertError, check_writable_folder, first_line


# The values dynbert.core accepts (a test checks they match). Not imported from there: that would
# load torch into every `dynbert sweep` and `dynbert train --cfg`, seconds before anything runs.
CHOICES = {
    "method.score": ("attention_received", "cls_attention"),
    "method.parametrization": ("clip", "sigmoid"),
    "method.layer_weighting": ("linear", "none"),
    "method.sparsity": ("ranks", "tokens"),
    "method.ranks": ("absolute", "relative"),
    "method.bimodal_schedule": ("hold", "constant"),
    "train.device": ("auto", "cpu", "cuda", "mps"),
    "train.precision": ("fp32", "bf16", "fp16"),
}
"""Keys with a fixed set of values; a method key is checked where the method's config has it."""
NON_NEGATIVE = ("train.lr", "train.weight_decay", "train.warmup_ratio", "train.max_grad_norm",
                "method.lr", "method.bimodal_weight", "method.threshold")
POSITIVE = ("method.temperature", "train.distill_temperature")
FRACTIONS = {
    "method.start": "the fraction of training before the method's parameters move, e.g. method.start=0.5",
    "method.harden_at": "the fraction of training where the gates are rounded and frozen, e.g. 0.8 (null: never)",
    "method.retrain_at": "the fraction of training where PoWER-BERT's retraining begins, e.g. 0.65",
    "method.freeze_at": "the fraction of training where LTP freezes its thresholds, e.g. 0.5 (null: never)",
}
"""Keys that are a point in training: a number in [0, 1)."""
OPTIONAL_FRACTIONS = ("method.freeze_at", "method.harden_at")
"""Fractions that may be null: a point training never reaches."""
LATER_FRACTIONS = {"method.retrain_at": "method.start", "method.freeze_at": "method.start",
                   "method.harden_at": "method.start"}
"""A stage boundary and the one it must come after."""
SEED_RANGE = (0, 2**32 - 1)
"""Seeds numpy and torch both accept."""
LAMBDA_MAX = 1e4
"""λ weighs a pruning loss of a few units (kept fractions summed over layers) against a task loss of about
1, and every method's grid stops at 1 or below: far past that the loss only overflows float32 (λ = 1e300
is inf), and the run would stop blaming the learning rate."""
MU_MAX = 100 * LAMBDA_MAX
"""The largest bi-modal weight μ = method.bimodal_weight × λ: the default weight (100) at the largest λ."""
FLOAT32_RANGE = (1.1754943508222875e-38, 3.4028234663852886e38)
"""The smallest normal and the largest float32: torch holds every number above as one, and a value outside
this range becomes 0 or inf there (lr=1e300 failed with "value cannot be converted to type float")."""
TINY_MODEL_SIZES = ("model.hidden_size", "model.num_layers", "model.num_heads", "model.intermediate_size",
                    "model.vocab_size")
"""The sizes of the tiny model built from scratch (model=tiny only)."""


def conf_dir() -> Path:
    """conf/ beside the package in a checkout; dynbert/conf inside an installed wheel."""
    checkout = Path(__file__).resolve().parent.parent / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    from importlib.resources import files

    return Path(str(files("dynbert.conf")))


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
            cfg = compose(config_name="config", overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as error:
        raise DynbertError(f"bad override: {_explain(error)}") from error
    finally:
        GlobalHydra.instance().clear()
    validate(cfg)
    _check_lambda_given(cfg, overrides)
    return cfg


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
    # The method's own knob, from its grid: a FLOPs target (knob_key's method.target) still reads λ.
    grid = cfg.method.get("grid")
    knob, lam, name = None if grid is None else str(grid).partition("=")[0].strip(), cfg["lambda"], cfg.method.name
    if knob == "lambda" or (knob is None and lam == 0):
        return
    if knob is None:
        raise DynbertError(f"lambda={lam} was given, but method={name} prunes nothing and does not read it: "
                           "drop lambda (or pass lambda=0)")
    raise DynbertError(f"lambda={lam} was given, but method={name} does not read it: its knob is {knob}, "
                       f"e.g. {knob}=0.5; drop lambda")


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
    """Reject values that would fail later, or silently mean nothing, with one clear sentence."""
    lam = cfg["lambda"]
    if not _is_number(lam) or not 0 <= lam <= LAMBDA_MAX:
        raise DynbertError(f"lambda={lam} is not valid: pass a number from 0 to {LAMBDA_MAX:g}, e.g. lambda=0.1 "
                           "(it weighs the pruning loss against the task loss, about 1; every method's grid "
                           "stops at 1 or below)")
    if not _is_int(cfg.seed) or not SEED_RANGE[0] <= cfg.seed <= SEED_RANGE[1]:
        raise DynbertError(f"seed={cfg.seed} is not valid: pass an integer from {SEED_RANGE[0]} to "
                           f"{SEED_RANGE[1]}, e.g. seed=0")
    _check_output_dir(cfg.output_dir)
    max_length = cfg.task.max_length
    if not isinstance(max_length, int) or max_length < 8:
        raise DynbertError(f"task.max_length={max_length} is not valid: pass an integer >= 8 "
                           "(room for CLS, SEP and text)")
    layers = cfg.method.get("layers")
    if layers is not None and (not OmegaConf.is_list(layers) or not layers
                               or not all(_is_int(i) for i in layers)):
        raise DynbertError(f"method.layers={layers} is not valid: pass null (every layer) or a non-empty list "
                           "of layer indices, e.g. method.layers=[0,1,2] (method=none prunes nothing)")
    target = cfg.method.get("target")
    if target is not None and (not _is_number(target) or not 0 < target < 1):
        raise DynbertError(f"method.target={target} is not valid: pass the FLOPs ratio to reach, a number in "
                           "(0, 1) (0.5 = 2x fewer FLOPs), or null to use lambda")
    keep = cfg.method.get("keep")
    if keep is not None and (not _is_number(keep) or not 0 < keep <= 1):
        raise DynbertError(f"method.keep={keep} is not valid: pass the fraction of tokens the last layer "
                           "keeps, a number in (0, 1], e.g. method.keep=0.5")
    for key in ("epochs", "batch_size", "eval_batch_size", "checkpoint_every", "gradient_accumulation_steps"):
        value = cfg.train[key]
        if not _is_int(value) or value < 1:
            raise DynbertError(f"train.{key}={value} is not valid: pass an integer >= 1")
    # A negative max_steps would train nothing and still write metrics; a string, fail mid-run. One
    # evaluation example has no correlation (STS-B, CoLA) and would fail after the whole training.
    for key, least in (("max_steps", 1), ("max_train_samples", 1), ("max_eval_samples", 2)):
        value = cfg.train[key]
        if value is not None and (not _is_int(value) or value < least):
            raise DynbertError(f"train.{key}={value} is not valid: pass null (no limit) or an integer >= {least}")
    for key in NON_NEGATIVE:
        value = OmegaConf.select(cfg, key, default=0.0)
        if not _is_number(value) or not 0 <= value <= FLOAT32_RANGE[1]:
            raise DynbertError(f"{key}={value} is not valid: pass a number >= 0 that a float32 holds (at most "
                               f"{FLOAT32_RANGE[1]:.2g})")
    warmup = cfg.train.warmup_ratio
    if warmup > 1:
        raise DynbertError(f"train.warmup_ratio={warmup} is not valid: pass the fraction of training over which "
                           "the learning rate warms up, a number in [0, 1]")
    bimodal = OmegaConf.select(cfg, "method.bimodal_weight")
    if bimodal is not None and bimodal * lam > MU_MAX:
        raise DynbertError(f"method.bimodal_weight={bimodal} with lambda={lam} is not valid: the bi-modal weight "
                           f"method.bimodal_weight × lambda must be at most {MU_MAX:g} (the default is 100 × lambda)")
    distill = cfg.train.distill
    if not _is_number(distill) or not 0 <= distill <= 1:
        raise DynbertError(f"train.distill={distill} is not valid: pass the weight of distillation, a number in [0, 1]")
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key, default=1.0)
        if not _is_number(value) or not FLOAT32_RANGE[0] <= value <= FLOAT32_RANGE[1]:
            raise DynbertError(f"{key}={value} is not valid: pass a number > 0 that a float32 holds (from "
                               f"{FLOAT32_RANGE[0]:.2g} to {FLOAT32_RANGE[1]:.2g})")
    for key, meaning in FRACTIONS.items():
        value = OmegaConf.select(cfg, key, default=0.0)
        if value is None and key in OPTIONAL_FRACTIONS:
            continue
        if not _is_number(value) or not 0 <= value < 1:
            raise DynbertError(f"{key}={value} is not valid: pass a number in [0, 1): it is {meaning}")
    for key, earlier in LATER_FRACTIONS.items():
        value, before = OmegaConf.select(cfg, key), OmegaConf.select(cfg, earlier)
        if value is not None and before is not None and value <= before:
            raise DynbertError(f"{key}={value} is not valid: it must come after {earlier}={before} "
                               "(both are fractions of training)")
    _check_grid(cfg)
    threads = cfg.train.num_threads
    if threads is not None and (not _is_int(threads) or threads < 1):
        raise DynbertError(f"train.num_threads={threads} is not valid: pass null (torch's default) or an integer >= 1")
    for key in TINY_MODEL_SIZES:
        value = OmegaConf.select(cfg, key, default=1)
        if not _is_int(value) or value < 1:
            raise DynbertError(f"{key}={value} is not valid: pass an integer >= 1")
    heads = OmegaConf.select(cfg, "model.num_heads")
    if heads is not None and cfg.model.hidden_size % heads:
        raise DynbertError(f"model.num_heads={heads} is not valid: model.hidden_size={cfg.model.hidden_size} must "
                           "split evenly into the heads, e.g. model.num_heads=4")
    for key in ("train.group_by_length", "method.monotone", "method.mask_attention", "train.overwrite",
                "sweep.baseline"):
        value = OmegaConf.select(cfg, key, default=False)
        if not isinstance(value, bool):
            raise DynbertError(f"{key}={value} is not valid: pass true or false")
    family = OmegaConf.select(cfg, "model.family", default=None)
    if family is not None:
        from .encoders import supported_model_types  # the families registered, not a copied list

        if family not in supported_model_types():
            raise DynbertError(f"model.family={family} is not valid: pass one of {', '.join(supported_model_types())}")
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=choices[0])
        if value not in choices:
            raise DynbertError(f"{key}={value} is not valid: pass one of {', '.join(choices)}")


def knob_key(method_cfg: DictConfig) -> str | None:
    """The key a method's trade-off knob is (``lambda``, ``method.keep``), from its ``grid``;
    ``method.target`` when the run asks for a FLOPs ratio instead; None for the un-pruned baseline."""
    grid = method_cfg.get("grid")
    if grid is None:
        return None
    if method_cfg.get("target") is not None:
        return "method.target"
    return str(grid).partition("=")[0].strip()


# A method's config names its run folder after its knob, or after its FLOPs target when it has one:
# `knob: ${knob:lambda${lambda},${method.target}}` gives lambda0.1, or target0.5.
OmegaConf.register_new_resolver("knob", lambda knob, target: knob if target is None else f"target{target}",
                                replace=True)


def _check_grid(cfg: DictConfig) -> None:
    """``method.grid`` is one override, ``<knob>=<values>``, whose key the config has."""
    grid = cfg.method.get("grid")
    if grid is None:
        return
    key, sep, values = str(grid).partition("=")
    key = key.strip()
    if not sep or not values.strip() or OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
        raise DynbertError(f"method.grid={grid} is not valid: pass the method's knob and the values a sweep "
                           "tries, as one override, e.g. lambda=0,0.1,1 or method.keep=0.3,0.5")


_MISSING = object()


def _check_output_dir(value) -> None:
    """A run folder that can be created, or one sentence on why ``output_dir=value`` cannot be one."""
    if value is None or not str(value).strip():
        raise DynbertError(f"output_dir is empty ({'null' if value is None else repr(value)}): pass a folder for the run, e.g. "
                           "output_dir=outputs/runs/my-run (an unset shell variable gives an empty value)")
    check_writable_folder(Path(str(value)).expanduser(), "output_dir=")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
