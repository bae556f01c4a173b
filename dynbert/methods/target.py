"""A FLOPs budget instead of a λ: the expected FLOPs ratio held to a target by a learned multiplier.

CoFi (Xia et al., ACL 2022, ``l0_module.lagrangian_regularization``) and ToP (KDD 2023) replace a
fixed sparsity weight by a Lagrangian term

    λ1 · (r − t) + λ2 · (r − t)²,

where r is the batch's FLOPs ratio with its decisions rounded (``GatedOutput.flops_ratio_hard``:
what hard mode runs and the report counts), its gradient that of the expected ratio of the soft
decisions (``flops_ratio_soft``, the same count of the tokens' weights: a straight-through
estimate), and t the target,
ramped linearly from 1 (nothing pruned) to ``target`` over the first half of the method's pruning
phase, then held. The model descends this term; the multipliers, starting at 0, *ascend* it after
every optimizer step: λ1 += lr · (r − t), λ2 += lr · (r − t)². While batches cost more than t, λ1
grows and the pull towards fewer tokens with it; when they cost less, λ1 shrinks and may turn
negative, letting tokens back. Plain gradient ascent, not Adam (CoFi's choice): its step is
proportional to the gap, so the multiplier settles where the gap closes; Adam's steps of about
its lr whatever the gap swung the ratio past the target and back (a 250-step SST-2 trial ended at
0.554 for 0.5, having lost the task on the way). The rounded ratio, not the expected one, drives
the multiplier: gates at 0.7 count 0.7 in expectation and 1 once rounded, and holding the
expectation to the target left a trial at 0.62 for 0.5 after the bi-modal push rounded them up.
So one ``method.target`` reaches the same FLOPs on every task, where one λ gave 1.6× on one task
and 2× on another.
"""

from __future__ import annotations

import torch
from torch import nn

TARGET_RAMP = 0.5
"""The share of the pruning phase over which the target falls from 1 to ``target``."""


def ramped_target(target: float, progress: float) -> float:
    """t at a point of the pruning phase (progress in [0, 1]): 1 → ``target`` over ``TARGET_RAMP``."""
    return 1.0 - (1.0 - target) * min(progress / TARGET_RAMP, 1.0)


class FlopsTarget(nn.Module):
    """The multipliers (λ1, λ2) of one method's FLOPs constraint: buffers, saved and checkpointed
    with the method, moved by ``ascend`` rather than by the optimizer."""

    def __init__(self, target: float, lr: float):
        super().__init__()
        if not 0 < target < 1:
            raise ValueError(f"method.target={target} must be a FLOPs ratio in (0, 1), e.g. 0.5 for 2x fewer")
        self.target, self.lr = target, lr
        self.register_buffer("multipliers", torch.zeros(2))
        self._gaps: list[torch.Tensor] = []

    def loss(self, soft_ratio: torch.Tensor, hard_ratio: torch.Tensor, progress: float) -> torch.Tensor:
        """The Lagrangian term for this batch; its gap is kept for the next ``ascend``."""
        ratio = soft_ratio + (hard_ratio - soft_ratio).detach()  # the rounded value, the expected gradient
        gap = ratio - ramped_target(self.target, progress)
        self._gaps.append(gap.detach())
        return self.multipliers[0] * gap + self.multipliers[1] * gap**2

    @torch.no_grad()
    def ascend(self) -> None:
        """After an optimizer step: move the multipliers up the gap of its batches (micro-batches averaged)."""
        if self._gaps:
            gap = torch.stack(self._gaps).mean()
            self.multipliers += self.lr * torch.stack([gap, gap**2])
            self._gaps.clear()

    @property
    def multiplier(self) -> float:
        """λ1: the price of a FLOPs ratio point at the end of training (what λ would have had to be)."""
        return float(self.multipliers[0])
