"""PoWER-BERT (Goyal et al., ICML 2020): search how many tokens each layer keeps, then retrain.

Public code: IBM/PoWER-BERT ``model/model.py`` (Keras). Three stages in one run, each a fraction
of training:

1. fine-tune (until ``start``): retention weights frozen at 1, no regularizer;
2. soft-extract search (until ``retrain_at``): in pruned layer l the token at rank j (CLS first,
   then by attention received) is multiplied by a retention weight W_lj in [0, 1] (init 1,
   clipped back into [0, 1] after every step, their Keras constraint), and the loss adds
   PoWER-BERT's L1 term (a sum over ranks, l 1-based)

       λ · Σ_l l · Σ_j W_lj

3. retraining (to the end): the retention k_l = ⌊Σ_j W_lj⌋ (their ``int(np.sum(W))``), made
   non-increasing over the layers, is fixed once (a buffer: saved, loaded and checkpointed), and
   each layer keeps CLS and
   the k_l − 1 present tokens with the highest score, in their original order (an input with fewer
   tokens keeps them all). Decisions are exactly 0/1 from here on, so training computes what the
   gathered model does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_choice, check_fraction, check_non_negative
from ..core import LayerTokens, RegularizerParts, TokenPruner, rank_tokens
from . import register
from .gates import RANK_INDEXING, TokenGates
from .stages import START, lr_window, phase_progress, reached
from .target import TARGET_INPUTS, FlopsTarget, flops_ratio_on


# A sum that is an integer but for float error (weights at exactly 1, say) must not lose a token.
_FLOOR_SLACK = 1e-4
# An AdamW step moves a retention weight by about its lr whatever λ's pull (Adam divides the
# gradient by its own running scale), so the search lowers a weight from 1 by about lr × its steps.
# Measured with MiniLM (docs/methods.md): at 0.35 (MRPC) and 0.24 (RTE) little was cut, at 0.77
# (SST-2) the weights reached 0.
_LEAST_REACH = 0.5


def retention_from(weights: torch.Tensor) -> torch.Tensor:
    """k_l = ⌊Σ_j W_lj⌋ (CLS's weight, 1, counted), at least 1, then non-increasing over layers: a
    layer keeps no more than the one before it (their ``get_configuration``)."""
    return _retention_from_mass(weights.sum(dim=1), weights.size(1))


def _retention_from_mass(mass: torch.Tensor, size: int) -> torch.Tensor:
    with torch.no_grad():
        counts = torch.floor(mass + _FLOOR_SLACK).long().clamp(1, size)
        return torch.cummin(counts, dim=0).values


def retention_for_target(weights: torch.Tensor, layers: list[int], dims, lengths: list[int],
                         target: float) -> torch.Tensor:
    """PoWER-BERT's k_l (relative ranks: the share k_l/N of each input) for a FLOPs target: its own rule
    ``k_l = ⌊α·Σ_j W_lj⌋`` (non-increasing over layers, at least 1) with the one scale α whose
    decisions cost ``target`` on inputs of these lengths, the nearest of the counts α can give.

    The search holds the batch's ratio near the target on average, but k_l is fixed from the weights
    of one step, and on the training lengths: on SST-2 (seed 0) that fixed 0.371 on dev for a target
    of 0.5. The scale keeps the shape the search found and moves its level to the target."""
    table_ratio = flops_ratio_on(lengths, layers, dims, relative=True)
    size = weights.size(1)
    mass = weights.sum(dim=1).clamp(min=1.0)  # CLS's weight counts; a row at 0 still scales

    def ratio(retention: torch.Tensor) -> float:
        return table_ratio(torch.arange(size)[None, :] < retention[:, None])  # rank share j/N < k_l/N opens

    low, high = 0.0, float(size / mass.min())  # every k_l at 1 .. every k_l at N
    for _ in range(40):  # the counts are steps of α: bisect to the first α at or above the target
        middle = (low + high) / 2
        if ratio(_retention_from_mass(mass * middle, size)) < target:
            low = middle
        else:
            high = middle
    return min((_retention_from_mass(mass * scale, size) for scale in (low, high)),
               key=lambda retention: abs(ratio(retention) - target))


@dataclass
class RetentionState:
    """What decides for one forward (``PowerBert.prepare``): fixed counts, or the search's weights."""

    counts: list[int] | None
    """k_l per pruned layer once decisions are 0/1 (hard mode, or the retraining stage); else None."""
    retention_weights: torch.Tensor | None
    """(pruned layers, max_length) W while the search's decisions are soft; else None."""


@register
class PowerBert(TokenPruner):
    """Retention weights per (layer, rank), searched under an L1 pull; then a fixed top-k_l per layer."""

    name = "power_bert"
    idle_parameters = True  # the weights are used in no loss once the retention is fixed
    never_pruned_advice = ("raise lambda or method.lr, or give the search more of training "
                           "(method.start earlier, method.retrain_at later)")

    def __init__(self, layers: list[int], max_length: int, lr: float = 3e-3, start: float = 0.33,
                 retrain_at: float = 0.67, ranks: str = "absolute", target: float | None = None,
                 target_lr: float = 2e-4):
        super().__init__(layers, max_length)
        if not 0 <= start < retrain_at <= 1:
            raise ValueError(f"method.start={start} must come before method.retrain_at={retrain_at} "
                             "(both fractions of training)")
        if ranks not in RANK_INDEXING:
            raise ValueError(f"unknown rank indexing {ranks!r}; expected one of {RANK_INDEXING}")
        # relative: rank r of n present tokens meets weight ⌊r·N/n⌋, and a fixed k_l keeps the
        # share k_l/N of each input, so the FLOPs it was searched for hold on inputs of other lengths.
        self.relative = ranks == "relative"
        if target is not None and not self.relative:
            # Absolute ranks past an input's length never meet a token, keep their weight of 1 and
            # swell k_l = ⌊Σ W⌋: a target searched on 13-token inputs would prune nothing.
            raise ValueError("method.target with power_bert needs method.ranks=relative (a kept share of each input)")
        self.flops_target = None if target is None else FlopsTarget(target, target_lr)
        self.retention_weights = TokenGates(len(layers), max_length, "clip")
        self.register_buffer("depth_weights", torch.tensor([layer + 1.0 for layer in layers]), persistent=False)
        # k_l once fixed; 0 until the retraining stage (a fixed k_l is at least 1: CLS).
        self.register_buffer("retention", torch.zeros(len(layers), dtype=torch.long))
        self.lr, self.start, self.retrain_at = lr, start, retrain_at
        self._lengths, self._dims = None, None  # the inputs a target is met on (``calibrate``)

    @classmethod
    def check(cls, cfg) -> None:
        check_non_negative(cfg, "method.lr")
        check_fraction(cfg, "method.start", START)
        check_fraction(cfg, "method.retrain_at", "the fraction of training where PoWER-BERT's retraining begins, "
                       "e.g. 0.65", after="method.start")
        check_choice(cfg, "method.ranks", RANK_INDEXING)
        check_choice(cfg, "method.target_inputs", TARGET_INPUTS)

    @classmethod
    def from_config(cls, method_cfg, layers, max_length, encoder) -> PowerBert:
        return cls(layers, max_length, lr=method_cfg.lr, start=method_cfg.start, retrain_at=method_cfg.retrain_at,
                   ranks=method_cfg.get("ranks", "absolute"), target=method_cfg.get("target"),
                   target_lr=method_cfg.get("target_lr"))

    @property
    def retention_fixed(self) -> bool:
        return bool(self.retention.min() > 0)

    def current_retention(self) -> torch.Tensor:
        """k_l: the fixed one, or what the search's weights would give now."""
        return self.retention if self.retention_fixed else retention_from(self.retention_weights())

    def calibrate(self, lengths: list[int], dims) -> None:
        self._lengths, self._dims = lengths, dims

    @torch.no_grad()
    def fix_retention_(self) -> None:
        """k_l from the search's weights; with a FLOPs target, scaled to cost it on the lengths of
        ``method.target_inputs`` (``retention_for_target``)."""
        weights = self.retention_weights().detach().cpu()
        if self.flops_target is not None and self._lengths is not None:
            counts = retention_for_target(weights, self.layers, self._dims, self._lengths, self.flops_target.target)
        else:
            counts = retention_from(weights)
        self.retention.copy_(counts)

    def prepare(self, hard: bool) -> RetentionState:
        if hard or self.retention_fixed:
            return RetentionState(counts=self.current_retention().tolist(), retention_weights=None)
        return RetentionState(counts=None, retention_weights=self.retention_weights())

    def keep_weights(self, state: RetentionState, row: int, tokens: LayerTokens, hard: bool) -> torch.Tensor:
        rank = rank_tokens(tokens.score, tokens.alive)
        present = tokens.alive.sum(dim=1, keepdim=True).clamp(min=1)
        if state.counts is not None:
            if self.relative:  # ⌊r·N/n⌋ < k  ⟺  r·N < k·n: the first k_l/N of the ranked tokens
                return (rank * self.max_length < state.counts[row] * present).to(tokens.score.dtype)
            return (rank < state.counts[row]).to(tokens.score.dtype)
        if self.relative:
            rank = (rank * self.max_length).div(present, rounding_mode="floor").clamp(max=self.max_length - 1)
        return state.retention_weights[row].gather(0, rank.flatten()).view_as(rank)

    def keeps_all(self, state: RetentionState, row: int, length: int) -> bool:
        return state.counts[row] >= (self.max_length if self.relative else length)

    def export_rule(self, state: RetentionState) -> dict:
        return dict(rule="retention", retention=list(state.counts), relative=self.relative)

    def regularizer(self, out, lam: float, step: int, total_steps: int) -> RegularizerParts | None:
        searching = reached(step, total_steps, self.start) and not reached(step, total_steps, self.retrain_at)
        if not searching or self.retention_fixed:
            return None
        l1 = (self.depth_weights * self.retention_weights().sum(dim=1)).sum()
        if self.flops_target is None:
            sparsity = lam * l1
        else:  # λ is learned: the multiplier holding the FLOPs target
            # The expected ratio both ways: k_l is fixed from the weights' sum, not by rounding each.
            progress = phase_progress(step, total_steps, self.start, self.retrain_at)
            quadratic = self.flops_target.quadratic(out.flops_ratio_soft, out.flops_ratio_soft, progress)
            sparsity = self.flops_target.multiplier * l1 + quadratic
        return RegularizerParts(sparsity=sparsity, bimodal=torch.zeros_like(sparsity))

    def schedule_warning(self, total_steps: int) -> str | None:
        search = lr_window(self.start, self.retrain_at)
        steps = sum(int(search(step, total_steps)) for step in range(total_steps))
        if steps == 0:
            return (f"the search (method.start={self.start} to method.retrain_at={self.retrain_at}) holds none of "
                    f"the run's {total_steps} optimizer step(s), so nothing will be pruned: train longer or widen it")
        reach = self.lr * steps
        if reach >= _LEAST_REACH:
            return None
        return (f"the search has {steps} optimizer step(s) at method.lr={self.lr:g}, and a step moves a retention "
                f"weight by about its lr, so from 1 the weights can fall by only about {reach:.2f} and few tokens "
                f"will be cut: raise method.lr to about 1/{steps} = {1 / steps:.2g} "
                f"or more (and lower lambda with it: at 0.01-0.03, lambda=1e-3 kept only CLS on RTE), "
                f"or train longer")

    def param_groups(self) -> list[dict]:
        return [dict(params=[self.retention_weights.raw], lr=self.lr, weight_decay=0.0,
                     schedule=lr_window(self.start, self.retrain_at))]

    def begin_step(self, step: int, total_steps: int) -> None:
        if reached(step, total_steps, self.retrain_at) and not self.retention_fixed:
            self.fix_retention_()

    def after_step(self) -> None:
        self.retention_weights.project_()
        if self.flops_target is not None:
            self.flops_target.ascend()

    def harden_(self) -> None:
        """A run that ends before retraining began is evaluated with the retention it reached."""
        if not self.retention_fixed:
            self.fix_retention_()
