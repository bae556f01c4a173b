"""Token-pruning methods, each one small module behind ``core.TokenPruner`` that registers its class.

A method is a ``TokenPruner`` subclass decorated with ``@register`` (its ``name``, its ``check`` of
its own config keys, ``from_config``) and a YAML, ``conf/method/<name>.yaml``, whose ``class`` names
it and which declares its knob, grid and defaults (``declarations.py``). Every module of this package
is imported, so a method here is one new file; a method kept elsewhere is imported from the dotted
path its YAML's ``class`` gives (docs/methods.md, "Adding a method").
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from ..errors import DynbertError, first_line

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from ..core import TokenPruner
    from ..encoders import EncoderAdapter

_METHODS: dict[str, type[TokenPruner]] = {}


def register(method: type[TokenPruner]) -> type[TokenPruner]:
    """Make ``method`` the class of its ``name`` (a class decorator)."""
    known = _METHODS.setdefault(method.name, method)
    if known is not method:
        raise ValueError(f"two methods are named {method.name!r}: {known.__qualname__} and {method.__qualname__}")
    return method


def registered(name: str) -> type[TokenPruner]:
    """The class registered as ``name``, or one sentence naming the registered ones."""
    if name not in _METHODS:
        raise DynbertError(f"method {name!r} is not a registered method ({', '.join(sorted(_METHODS))})")
    return _METHODS[name]


def method_class(method_cfg: DictConfig) -> type[TokenPruner]:
    """The class a run's ``method`` config names: the dotted path in its ``class`` (importing it registers
    a method kept outside dynbert), or, in a run folder written before configs named classes, its ``name``."""
    path = method_cfg.get("class")
    if path is None:
        return registered(method_cfg.name)
    module, _, attribute = str(path).rpartition(".")
    try:
        method = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise DynbertError(f"method.class={path} does not import ({first_line(error)}): pass the dotted path "
                           "of a registered method class, e.g. dynbert.methods.gates.Gates") from error
    if _METHODS.get(getattr(method, "name", None)) is not method:
        raise DynbertError(f"method.class={path} is not a registered method: decorate it with "
                           "@dynbert.methods.register")
    if method.name != method_cfg.name:
        raise DynbertError(f"method.class={path} is registered as {method.name!r}, but the config names the method "
                           f"{method_cfg.name!r}: make method.name its registered name")
    return method


def from_config(method_cfg: DictConfig, encoder: EncoderAdapter, max_length: int) -> TokenPruner:
    """The method ``method_cfg`` asks for, pruning ``method_cfg.layers`` (null: every layer) of
    ``encoder``'s model, for inputs of up to ``max_length`` tokens."""
    num_layers = encoder.dims.num_layers
    layers = list(range(num_layers)) if method_cfg.get("layers") is None else sorted(set(method_cfg.layers))
    if any(not 0 <= layer < num_layers for layer in layers):
        raise ValueError(f"method.layers={list(method_cfg.layers)} is out of range: the model has layers "
                         f"0..{num_layers - 1}")
    return method_class(method_cfg).from_config(method_cfg, layers, max_length, encoder)


# Every module of this package is one method that registers itself when imported: a new method is
# one new file (and its YAML), and nothing else in dynbert changes.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
