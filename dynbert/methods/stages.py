"""Points in training where a method changes what it does, and the lr factors that go with them.

Stage boundaries are fractions of the run's optimizer steps, so one config means the same thing
for a 4-step smoke run and a 6-epoch study. Step ``step`` is the optimizer step about to be taken
(0-based): it belongs to the stage that begins at or before ``fraction · total_steps``.
"""

from __future__ import annotations

START = "the fraction of training before the method's parameters move, e.g. method.start=0.5"
"""What ``method.start`` is, for the sentence that refuses a bad one (``checks.check_fraction``)."""


def reached(step: int, total_steps: int, fraction: float | None) -> bool:
    """Whether training has reached ``fraction`` of its steps (None: a point never reached)."""
    return fraction is not None and step >= fraction * total_steps


def phase_progress(step: int, total_steps: int, start: float, end: float = 1.0) -> float:
    """How far a phase from fraction ``start`` to ``end`` of training is, in [0, 1]."""
    begin, finish = start * total_steps, end * total_steps
    return min(max((step - begin) / max(1.0, finish - begin), 0.0), 1.0)


def lr_window(start: float, end: float):
    """An lr schedule: the full rate from fraction ``start`` of training until ``end``, 0 outside."""
    def schedule(step: int, total_steps: int) -> float:
        return 1.0 if reached(step, total_steps, start) and not reached(step, total_steps, end) else 0.0
    return schedule


def lr_decay(start: float, end: float):
    """An lr schedule: 0 before fraction ``start``, then linear from 1 down to 0 at ``end``."""
    def schedule(step: int, total_steps: int) -> float:
        begin, finish = start * total_steps, end * total_steps
        if step < begin or step >= finish:
            return 0.0
        return 1.0 - (step - begin) / max(1.0, finish - begin)
    return schedule
