"""The un-pruned baseline (``method=none``): plain fine-tuning, nothing dropped.

It prunes no layer, so the engine never asks it for keep weights; it declares no knob
(``conf/method/none.yaml``), which is what makes it a baseline for sweeps and reports.
"""

from __future__ import annotations

from ..core import TokenPruner
from . import register


@register
class NoPruning(TokenPruner):
    """The un-pruned baseline: every layer keeps every token."""

    name = "none"

    @classmethod
    def from_config(cls, method_cfg, layers, max_length, encoder) -> NoPruning:
        return cls([], max_length)

    def keep_weights(self, state, row, tokens, hard):  # pragma: no cover - it has no layers
        raise AssertionError("the baseline prunes no layer")

    def export_rule(self, state) -> dict:
        return dict(rule="none", score=None)
