"""Fixed schedules: each pruned layer keeps a set fraction of the input's tokens, the most attended.

What `dynbert bench` times beside a trained run's method: how fast inference is when a layer keeps
so many tokens, whatever learned it. A shape names the fraction f_l each pruned layer l (of a model
of L layers) keeps of each input's n real tokens, ⌈f_l · n⌉ (top-k's count, CLS counted):

- ``full``: every token (f = 1);
- ``keep70`` ... ``keep10``: the first pruned layer keeps that percentage, later layers keep what
  remains (f = 0.7, then 1, ...);
- ``power``: a PoWER-BERT-like decay, f_l = 0.15^((l+1)/L), so the last layer keeps 15%.

The decisions are top-k's (``TopK``: ranks by the kernel's score, exactly 0/1); only the fractions
differ, and the score (``attention_received`` or ``cls_attention``) is the bench's choice. It has no
YAML: nothing is learned, so there is nothing to train or sweep.
"""

from __future__ import annotations

from . import register
from .topk import TopK

SHAPES = ("full", "keep70", "keep50", "keep30", "keep10", "power")
POWER_LAST_FRACTION = 0.15
"""``power``: the fraction of tokens the last layer keeps; earlier layers decay geometrically."""


def shape_fractions(shape: str, layers: list[int], num_layers: int) -> list[float]:
    """f_l for each pruned layer of ``shape`` (one of ``SHAPES``)."""
    if shape == "full":
        return [1.0] * len(layers)
    if shape == "power":
        return [POWER_LAST_FRACTION ** ((layer + 1) / num_layers) for layer in layers]
    if shape in SHAPES:  # keepNN
        return [int(shape[4:]) / 100] + [1.0] * (len(layers) - 1)
    raise ValueError(f"unknown fixed schedule {shape!r}; expected one of {', '.join(SHAPES)}")


@register
class FixedSchedule(TopK):
    """A shape's fractions on top-k's machinery, ranking by the score the bench asks for."""

    name = "schedule"

    def __init__(self, layers: list[int], max_length: int, num_layers: int, shape: str, score: str):
        self.shape = shape  # before TopK's __init__, which computes the schedule's counts from it
        super().__init__(layers, max_length, num_layers, keep=1.0)
        self.score = score

    def schedule_fractions(self) -> list[float]:
        return shape_fractions(self.shape, self.layers, self.num_layers)
