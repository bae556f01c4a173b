"""A FLOPs budget instead of a λ: λ learned as the multiplier that holds the FLOPs ratio to a target.

CoFi (Xia et al., ACL 2022, ``l0_module.lagrangian_regularization``) and ToP (KDD 2023) replace a
fixed sparsity weight by a Lagrange multiplier learned by dual ascent, with the target ramped in.
Here each method keeps its own sparsity term (the gates' depth-weighted expected kept fraction,
LTP's mean mask, PoWER-BERT's weighted L1) and λ in it becomes the multiplier λ1, which after every
optimizer step *ascends* the gap between the batch's FLOPs ratio r and the target t:

    λ1 += lr · (r − t),    λ2 += lr · (r − t)²,    loss += λ1 · S(decisions) + λ2 · (r − t)²

r is the engine's own count (``flops_per_example``) of the batch: the value of the rounded
decisions (``GatedOutput.flops_ratio_hard``: what hard mode runs and the report counts) with the
gradient of the soft ones (``flops_ratio_soft``), so the constraint and the report count the same
thing. t falls linearly from 1 to ``target`` over the first half of the method's pruning phase,
then holds. While batches cost more than t, λ1 grows and the pull with it; when they cost less it
shrinks, may turn negative and lets tokens back. λ2 (CoFi's quadratic term) only grows.

Why the method's own S and not the FLOPs ratio as the pull (what a first version did): the FLOPs
count makes a token dropped early the cheapest saving, so the gates cut layer 2 to 68% and layer 6
to 5% and lost 3.8 points on SST-2 at 0.455 (seed 0), while the gates' depth weighting (deeper
layers pay more) had kept early layers whole at the same FLOPs. Plain gradient steps, not Adam:
a step proportional to the gap settles where the gap closes, and with the multiplier on λ's own
scale the step size is per method (``target_lr``: λ for the gates is ~0.1, for PoWER-BERT ~1e-3).
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

    @property
    def multiplier(self) -> float:
        """λ1: the λ of the method's sparsity term now (at the end: what λ would have had to be)."""
        return float(self.multipliers[0])

    def quadratic(self, soft_ratio: torch.Tensor, hard_ratio: torch.Tensor, progress: float) -> torch.Tensor:
        """λ2 · (r − t)² for this batch; the gap is kept for the next ``ascend``."""
        ratio = soft_ratio + (hard_ratio - soft_ratio).detach()  # the rounded value, the expected gradient
        gap = ratio - ramped_target(self.target, progress)
        self._gaps.append(gap.detach())
        return self.multipliers[1] * gap**2

    @torch.no_grad()
    def ascend(self) -> None:
        """After an optimizer step: move the multipliers up the gap of its batches (micro-batches averaged)."""
        if self._gaps:
            gap = torch.stack(self._gaps).mean()
            self.multipliers += self.lr * torch.stack([gap, gap**2])
            self._gaps.clear()
