"""Checks of config values, each failing in one sentence that names the key and what to pass.

The engine's keys are checked in ``config.validate``; a method's own keys by its class's ``check``
(``core.TokenPruner.check``), with these helpers, so that a bad value fails when the config is
composed, before any work. No torch here: the helpers run in every `dynbert train --cfg`.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from .errors import DynbertError

FLOAT32_RANGE = (1.1754943508222875e-38, 3.4028234663852886e38)
"""The smallest normal and the largest float32: torch holds every number above as one, and a value outside
this range becomes 0 or inf there (lr=1e300 failed with "value cannot be converted to type float")."""
LAMBDA_MAX = 1e4
"""λ weighs a pruning loss of a few units (kept fractions summed over layers) against a task loss of about
1, and every method's grid stops at 1 or below: far past that the loss only overflows float32 (λ = 1e300
is inf), and the run would stop blaming the learning rate."""

_ABSENT = object()


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=_ABSENT)


def check_non_negative(cfg: DictConfig, *keys: str) -> None:
    """Each key present: a number >= 0 that a float32 holds (a rate, a weight, a threshold)."""
    for key in keys:
        value = _value(cfg, key)
        if value is not _ABSENT and (not is_number(value) or not 0 <= value <= FLOAT32_RANGE[1]):
            raise DynbertError(f"{key}={value} is not valid: pass a number >= 0 that a float32 holds (at most "
                               f"{FLOAT32_RANGE[1]:.2g})")


def check_positive(cfg: DictConfig, *keys: str) -> None:
    """Each key present: a number > 0 that a float32 holds (a temperature: it divides)."""
    for key in keys:
        value = _value(cfg, key)
        if value is not _ABSENT and (not is_number(value) or not FLOAT32_RANGE[0] <= value <= FLOAT32_RANGE[1]):
            raise DynbertError(f"{key}={value} is not valid: pass a number > 0 that a float32 holds (from "
                               f"{FLOAT32_RANGE[0]:.2g} to {FLOAT32_RANGE[1]:.2g})")


def check_fraction(cfg: DictConfig, key: str, meaning: str, optional: bool = False, after: str | None = None) -> None:
    """A point in training: a number in [0, 1) (null too when ``optional``: a point never reached),
    later than the fraction ``after`` when both are set. ``meaning`` finishes "it is ..."."""
    value = _value(cfg, key)
    if value is _ABSENT or (value is None and optional):
        return
    if not is_number(value) or not 0 <= value < 1:
        raise DynbertError(f"{key}={value} is not valid: pass a number in [0, 1): it is {meaning}")
    before = None if after is None else OmegaConf.select(cfg, after)
    if before is not None and value <= before:
        raise DynbertError(f"{key}={value} is not valid: it must come after {after}={before} "
                           "(both are fractions of training)")


def check_choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> None:
    """Each key present: one of ``choices``."""
    value = _value(cfg, key)
    if value is not _ABSENT and value not in choices:
        raise DynbertError(f"{key}={value} is not valid: pass one of {', '.join(choices)}")


def check_bool(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = _value(cfg, key)
        if value is not _ABSENT and not isinstance(value, bool):
            raise DynbertError(f"{key}={value} is not valid: pass true or false")
