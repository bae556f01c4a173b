"""LTP, Learned Token Pruning (Kim et al., KDD 2022): a learned score threshold per layer.

Public code: kssteven418/LTP (``src/transformers/models/ltp/``, ``trainer.py``). A token's score
in pruned layer l is the attention probability it receives, averaged over heads and present queries,

    s_i = (1 / (H · n_q)) Σ_h Σ_q A[h, q, i],

and the layer's threshold is θ_l = base_l + δ_l, with base_l = threshold · (l + 1)/L (their
``final_token_threshold``, default 0.01, reached at the last layer) and δ_l learned (init 0, its
own lr). Three stages in one run, each a fraction of training:

1. fine-tune (until ``start``; LTP starts from a fine-tuned checkpoint): every token kept;
2. soft thresholds (until ``freeze_at``, or the end when it is null): each token is weighted by
   m = sigmoid((s − θ_l) / T) and the loss adds λ · Σ_l mean(m_l) over the batch's real tokens;
3. hard thresholds (from ``freeze_at``): θ frozen, weights exactly 1[s ≥ θ_l] while the model is
   fine-tuned (their second run, ``masking_mode hard``).

At inference a layer keeps the present tokens with s ≥ θ_l (and CLS), physically gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import check_choice, check_fraction, check_non_negative, check_positive
from ..core import GatedOutput, LayerTokens, RegularizerParts, TokenPruner
from . import register
from .stages import START, lr_decay, phase_progress, reached
from .target import TARGET_INPUTS, FlopsTarget, scale_for_target

FINE_TUNE, SOFT, HARD = 0, 1, 2
"""The stages, in order (``LearnedTokenPruning.stage``)."""


@dataclass
class ThresholdState:
    """The thresholds for one forward (``LearnedTokenPruning.prepare``)."""

    thresholds: torch.Tensor
    """(pruned layers,) θ_l."""
    stage: int
    """The stage the decisions follow (``FINE_TUNE``, ``SOFT``, ``HARD``): hard mode decides as ``HARD``."""
    keeps_all: list[bool] | None
    """Hard mode: per pruned layer, whether its threshold keeps every token (θ_l <= 0: scores are >= 0)."""


@register
class LearnedTokenPruning(TokenPruner):
    """A threshold per layer on the head- and query-averaged attention a token receives."""

    name = "ltp"
    idle_parameters = True  # stages 1 and 3 give the thresholds no gradient
    never_pruned_advice = ("raise lambda or method.threshold, or give the thresholds more of training "
                           "(method.start earlier, method.freeze_at later)")
    undecided_advice = "lower method.temperature, or let the thresholds freeze before the end (method.freeze_at)"

    def __init__(self, layers: list[int], max_length: int, num_layers: int, num_heads: int,
                 threshold: float = 0.01, temperature: float = 1e-3, lr: float = 2e-5, start: float = 0.33,
                 freeze_at: float | None = 0.67, target: float | None = None, target_lr: float = 0.02):
        super().__init__(layers, max_length)
        if temperature <= 0:
            raise ValueError(f"method.temperature={temperature} must be > 0")
        if freeze_at is not None and not start < freeze_at:
            raise ValueError(f"method.start={start} must come before method.freeze_at={freeze_at}")
        self.num_heads, self.temperature = num_heads, temperature
        self.lr, self.start, self.freeze_at = lr, start, freeze_at
        self.register_buffer("base", torch.tensor([threshold * (layer + 1) / num_layers for layer in layers]),
                             persistent=False)
        self.offsets = nn.Parameter(torch.zeros(len(layers)))
        # Saved with the model: a trained (hardened) model decides 0/1 in soft mode too, once reloaded.
        self.register_buffer("stage", torch.tensor(SOFT))
        # method.target: the soft stage holds the FLOPs ratio to it instead of weighing masks by λ.
        self.flops_target = None if target is None else FlopsTarget(target, target_lr)

    @classmethod
    def check(cls, cfg) -> None:
        check_non_negative(cfg, "method.lr", "method.threshold")
        check_positive(cfg, "method.temperature")
        check_fraction(cfg, "method.start", START)
        check_fraction(cfg, "method.freeze_at", "the fraction of training where LTP freezes its thresholds, e.g. 0.5 "
                       "(null: never)", optional=True, after="method.start")
        check_choice(cfg, "method.target_inputs", TARGET_INPUTS)

    @classmethod
    def from_config(cls, method_cfg, layers, max_length, encoder) -> LearnedTokenPruning:
        return cls(layers, max_length, encoder.dims.num_layers, encoder.num_heads, threshold=method_cfg.threshold,
                   temperature=method_cfg.temperature, lr=method_cfg.lr, start=method_cfg.start,
                   freeze_at=method_cfg.freeze_at, target=method_cfg.get("target"),
                   target_lr=method_cfg.get("target_lr"))

    def thresholds(self) -> torch.Tensor:
        """θ_l = base_l + δ_l, one per pruned layer."""
        return self.base + self.offsets

    def prepare(self, hard: bool) -> ThresholdState:
        """Hard mode decides as stage 3 does. The stage and which layers keep every token are read
        once here, not per layer: each read of a GPU tensor into Python waits for the GPU."""
        thresholds = self.thresholds()
        if hard:
            thresholds = thresholds.detach()
            return ThresholdState(thresholds, HARD, (thresholds <= 0).tolist())
        return ThresholdState(thresholds, int(self.stage), None)

    def keep_weights(self, state: ThresholdState, row: int, tokens: LayerTokens, hard: bool) -> torch.Tensor:
        present_queries = tokens.alive.sum(dim=1, keepdim=True).clamp(min=1)
        received = tokens.score / (self.num_heads * present_queries)  # s_i, the mean attention received
        if state.stage == HARD:
            return (received >= state.thresholds[row]).to(received.dtype)
        if state.stage == FINE_TUNE:
            return torch.ones_like(received)
        return torch.sigmoid((received - state.thresholds[row]) / self.temperature)

    def keeps_all(self, state: ThresholdState, row: int, length: int) -> bool:
        return state.keeps_all[row]

    def export_rule(self, state: ThresholdState) -> dict:
        return dict(rule="threshold", thresholds=state.thresholds.float().tolist(), num_heads=self.num_heads)

    def regularizer(self, out: GatedOutput, lam: float, step: int, total_steps: int) -> RegularizerParts | None:
        if int(self.stage) != SOFT:
            return None
        kept_mean = out.keep_weights.sum(dim=(0, 2)) / out.num_tokens.sum()  # per layer, over real tokens
        if self.flops_target is None:
            sparsity = lam * kept_mean.sum()
        else:  # λ is learned: the multiplier holding the FLOPs target
            progress = phase_progress(step, total_steps, self.start, 1.0 if self.freeze_at is None else self.freeze_at)
            quadratic = self.flops_target.quadratic(out.flops_ratio_soft, out.flops_ratio_hard, progress)
            sparsity = self.flops_target.multiplier * kept_mean.sum() + quadratic
        return RegularizerParts(sparsity=sparsity, bimodal=torch.zeros_like(sparsity))

    def after_step(self) -> None:
        if self.flops_target is not None:
            self.flops_target.ascend()

    def param_groups(self) -> list[dict]:
        end = 1.0 if self.freeze_at is None else self.freeze_at
        return [dict(params=[self.offsets], lr=self.lr, weight_decay=0.0, schedule=lr_decay(self.start, end))]

    def begin_step(self, step: int, total_steps: int) -> None:
        if reached(step, total_steps, self.freeze_at):
            stage = HARD
        elif reached(step, total_steps, self.start):
            stage = SOFT
        else:
            stage = FINE_TUNE
        self.stage.fill_(stage)

    @torch.no_grad()
    def settle(self, step: int, total_steps: int, hard_ratio) -> str | None:
        """With a FLOPs target, at the first step of the hard stage and after the last step: all thresholds
        times one scale s, bisected so that hard mode costs the target on ``method.target_inputs``
        (``scale_for_target``).

        The multiplier holds each training batch's ratio near the target, but the thresholds act on
        attention scores, which depend on the texts and their lengths: SST-2 (seed 0) froze at 0.563 on
        its training phrases and gave 0.542 on dev. No length-only rule can place a threshold; a pass
        over the inputs in hard mode can. The model's scores keep moving while it fine-tunes with the
        frozen thresholds (settled at the freeze only, the same run drifted from 0.500 to 0.566 on dev
        by the end), so the end settles again: the decisions it is scored with cost the target. Each
        is deterministic, so a resumed run settles alike; one resumed after the freeze has those
        thresholds in its checkpoint."""
        if self.flops_target is None or not reached(step, total_steps, self.freeze_at):
            return None
        if reached(step - 1, total_steps, self.freeze_at) and step != total_steps:
            return None
        learned = self.thresholds().clone()

        def ratio_at(scale: float) -> float:
            self.offsets.copy_(scale * learned - self.base)
            return hard_ratio()

        scale, ratio = scale_for_target(ratio_at, self.flops_target.target)
        self.offsets.copy_(scale * learned - self.base)
        return (f"thresholds {[round(value, 5) for value in learned.tolist()]} times {scale:.3f}: "
                f"FLOPs ratio {ratio:.3f} on the target inputs (target {self.flops_target.target})")

    def harden_(self) -> None:
        self.stage.fill_(HARD)
