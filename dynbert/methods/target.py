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

A batch's ratio swings with its lengths (relative ranks round a 3-token phrase coarsely), so the
gates' state at any one step costs the target only roughly; the gates are therefore rounded so that
their decisions cost the target on the lengths of ``method.target_inputs`` (dev's texts by default,
``gates_to_open``: the highest gates open), not at 0.5, and not pushed to 0 or 1 by the bi-modal term
beforehand.

What first versions did, on SST-2 (MiniLM, seed 0): the FLOPs ratio itself as the pull made a token
dropped early the cheapest saving (layer 2 cut to 68%, layer 6 to 5%: 81.77 against 85.55 at
0.455); the gates' own depth-weighted term with the bi-modal push tied to λ1 froze the gates when
the push began and ended 0.02 above the target, 3 points below the baseline. Plain gradient steps,
not Adam, move the multipliers: a step proportional to the gap settles where the gap closes; with
the multiplier on λ's own scale the step is per method (``target_lr``: ~0.02 for the gates' λ,
2e-4 for PoWER-BERT's).
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


def rounded_counts(gates: torch.Tensor, layers: list[int], num_layers: int, lengths: torch.Tensor,
                   relative: bool, threshold: float) -> torch.Tensor:
    """(inputs, num_layers) tokens left after each layer when a pruned layer keeps rank r of its c
    present tokens iff r is 0 (CLS) or its gate (row of ``gates`` for that layer, index ⌊r·N/c⌋ with
    ``relative`` ranks, else r) is at least ``threshold``: what hard mode keeps, which depends on
    the count of tokens only, not on which tokens they are."""
    size = gates.size(1)
    rows = {layer: row for row, layer in enumerate(layers)}
    ranks = torch.arange(size)[None, :]
    count, kept = lengths.clone(), []
    for layer in range(num_layers):
        if layer in rows:
            index = (ranks * size).div(count[:, None].clamp(min=1), rounding_mode="floor") if relative else ranks
            values = gates[rows[layer]][index.clamp(max=size - 1)]
            keep = (ranks < count[:, None]) & ((ranks == 0) | (values >= threshold))
            count = keep.sum(dim=1)
        kept.append(count)
    return torch.stack(kept, dim=1)


def flops_ratio_on(lengths: list[int], layers: list[int], dims, relative: bool):
    """``ratio(table)``: the FLOPs ratio, on inputs of these lengths, of the hard decisions of a 0/1
    table (pruned layers x ranks, as ``rounded_counts`` reads it), by the engine's own count."""
    from ..core import baseline_kept, flops_per_example  # the engine's count, as everywhere

    distinct, times = torch.unique(torch.tensor(lengths), return_counts=True)  # a few dozen, not 8,000
    share = times.double() / times.sum()
    full = (flops_per_example(distinct, baseline_kept(distinct, dims.num_layers), dims) * share).sum()

    def ratio(table: torch.Tensor) -> float:
        kept = rounded_counts(table.float(), layers, dims.num_layers, distinct, relative, 0.5)
        return float((flops_per_example(distinct, kept, dims) * share).sum() / full)

    return ratio


def scale_for_target(ratio_at, target: float, bisections: int = 10) -> tuple[float, float]:
    """The scale s >= 0 whose ``ratio_at(s)`` is nearest ``target``, and that ratio, for a FLOPs ratio
    that falls as s grows from ``ratio_at(0) = 1`` (LTP's thresholds times s): doubled from 1 until the
    ratio is at or below the target, then bisected. Each ``ratio_at`` is a pass over the inputs, so values are cached."""
    seen: dict[float, float] = {}

    def ratio(scale: float) -> float:
        if scale not in seen:
            seen[scale] = ratio_at(scale)
        return seen[scale]

    low, high = 0.0, 1.0
    while ratio(high) > target and high < 2.0**10:
        low, high = high, 2 * high
    if ratio(high) > target:  # unreachable by scaling (thresholds at or below 0 keep everything)
        return high, ratio(high)
    for _ in range(bisections):
        middle = (low + high) / 2
        low, high = (middle, high) if ratio(middle) > target else (low, middle)
    best = min((low, high), key=lambda scale: abs(ratio(scale) - target))
    return best, ratio(best)


TARGET_INPUTS = ("dev", "train")
"""``method.target_inputs``: the inputs whose lengths a target is met on. ``dev``, the evaluation split's
texts (their lengths only, no labels): the inputs a run is scored on, standing in for those it will
serve. ``train``: the training inputs, which differ where a task trains on other texts (SST-2 trains
on phrases of 13 tokens on average and is scored on sentences of 25: rounded to 0.500 on its training
lengths, the gates gave 0.456 on dev)."""


def gates_to_open(gates: torch.Tensor, layers: list[int], dims, lengths: list[int], relative: bool,
                  target: float) -> torch.Tensor:
    """Which gates to round to 1 (the rest to 0) so that the hard decisions cost ``target`` of the
    un-pruned FLOPs on inputs of these lengths: the first k gates in the order of their values
    (highest first; equal values: lower ranks, then earlier layers first), k the nearest to the target.

    The multiplier holds the rounded ratio of each batch near the target, but gates still moving
    round to a ratio that depends on the step they are rounded at; rounding where the decisions cost
    the target on the lengths of the inputs to serve lands on the target itself (±a gate's worth).
    A threshold on the values alone could not: clipped gates sit at exactly 0 or 1 by the dozen, and
    one step of the threshold opens or closes them all (MRPC, seed 0: 0.464 for a target of 0.5,
    because no gate above 0 was left to open). Gates already 0 or 1 are left as they are."""
    if bool(((gates == 0) | (gates == 1)).all()):
        return gates == 1
    table_ratio = flops_ratio_on(lengths, layers, dims, relative)
    rows, size = gates.shape
    rank, row = torch.arange(size).expand(rows, size), torch.arange(rows)[:, None].expand(rows, size)
    # Lexicographic order (value down, rank up, layer up) by three stable sorts, last key first.
    order = torch.argsort(row.flatten(), stable=True)
    order = order[torch.argsort(rank.flatten()[order], stable=True)]
    order = order[torch.argsort(gates.flatten()[order], descending=True, stable=True)]

    def opened(count: int) -> torch.Tensor:
        is_open = torch.zeros(rows * size, dtype=torch.bool)
        is_open[order[:count]] = True
        return is_open.view(rows, size)

    def ratio(count: int) -> float:
        return table_ratio(opened(count))

    # The ratio never falls as gates open: bisect for the first count at or above the target.
    low, high = 0, rows * size
    while low < high:
        middle = (low + high) // 2
        if ratio(middle) < target:
            low = middle + 1
        else:
            high = middle
    best = min((count for count in (low - 1, low) if 0 <= count <= rows * size),
               key=lambda count: abs(ratio(count) - target))
    return opened(best)

