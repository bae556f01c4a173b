"""Top-k: a fixed keep schedule, the tokens that receive the most attention kept (a baseline).

The fraction of each input's tokens kept after encoder layer l (0-based, L layers) falls linearly
from 1 to ``keep`` at the last layer:

    f_l = 1 − (1 − keep) · (l + 1) / L,        k_l = ⌈f_l · n⌉

with n the input's real tokens, CLS counted. A pruned layer keeps CLS and the k_l − 1 present
tokens that receive the most attention (summed over heads and present queries), in their original
order. The decisions are always 0/1, so training (soft mode) computes exactly what the gathered
model does; the model is fine-tuned with the schedule in place from the first step.

With ``method.target``, keep is solved from the training inputs' lengths so that the schedule
costs the target (``keep_for_target``); it may then fall below 0, a line that reaches zero before
the last layer: the layers past that point keep CLS alone. (Between 0 and 1 only, a 6-layer model
cannot go below about 0.45 of its FLOPs.)
"""

from __future__ import annotations

import math

import torch

from ..checks import is_number
from ..core import LayerTokens, TokenPruner, baseline_kept, flops_per_example, rank_tokens
from ..encoders import EncoderDims
from ..errors import DynbertError
from . import register

# f_l · n is computed in floating point: 0.7 · 10 must keep 7 tokens, not ⌈7.000000000000001⌉ = 8.
_CEIL_SLACK = 1e-9


def keep_fractions(layers: list[int], num_layers: int, keep: float) -> list[float]:
    """f_l for each pruned layer: 1 − (1 − keep)·(l + 1)/L, so the last layer keeps ``keep``
    (a fraction below 0 keeps CLS alone)."""
    if keep > 1:
        raise ValueError(f"keep={keep} must be at most 1")
    return [1.0 - (1.0 - keep) * (layer + 1) / num_layers for layer in layers]


def keep_counts(fraction: float, max_length: int) -> torch.Tensor:
    """k = ⌈fraction · n⌉, at least 1 (CLS), for every length n = 0..max_length (index by n).

    A table computed once in double precision on the CPU: on the device a lookup is exact on
    every backend (MPS has no float64) and costs no synchronisation.
    """
    return torch.tensor([max(1, math.ceil(fraction * n - _CEIL_SLACK)) for n in range(max_length + 1)])


def schedule_kept(num_tokens: torch.Tensor, layers: list[int], num_layers: int, keep: float) -> torch.Tensor:
    """(inputs, num_layers) tokens present after each layer under the schedule, for inputs of
    ``num_tokens`` tokens: ⌈f_l·n⌉ after a pruned layer, the count before after any other."""
    fractions = dict(zip(layers, keep_fractions(layers, num_layers, keep)))
    kept, current = [], num_tokens.clone()
    for layer in range(num_layers):
        if layer in fractions:
            current = torch.minimum(current, keep_counts(fractions[layer], int(num_tokens.max()))[num_tokens])
        kept.append(current)
    return torch.stack(kept, dim=1)


def keep_for_target(target: float, lengths: list[int], layers: list[int], dims: EncoderDims) -> float:
    """The ``keep`` whose schedule costs ``target`` of the un-pruned FLOPs on inputs of these lengths
    (bisection: the cost grows with keep), so that top-k and random meet a FLOPs budget as the
    learned methods do."""
    num_tokens = torch.tensor(lengths)
    full = flops_per_example(num_tokens, baseline_kept(num_tokens, dims.num_layers), dims).mean()

    def ratio(keep: float) -> float:
        kept = schedule_kept(num_tokens, layers, dims.num_layers, keep)
        return float(flops_per_example(num_tokens, kept, dims).mean() / full)

    least = 1.0 - dims.num_layers  # every pruned layer's fraction <= 0: CLS alone from the first
    floor = ratio(least)
    if target < floor:
        raise ValueError(f"method.target={target} is below the least this schedule can cost on these inputs "
                         f"({floor:.3f}, keeping CLS alone from the first pruned layer on): pass a target of at "
                         f"least {floor:.2f}, or prune more layers (method.layers)")
    low, high = least, 1.0
    for _ in range(50):
        keep = (low + high) / 2
        low, high = (keep, high) if ratio(keep) < target else (low, keep)
    return high


@register
class TopK(TokenPruner):
    """A fixed keep schedule; each pruned layer keeps the top-k tokens by attention received."""

    name = "topk"
    never_pruned_advice = "lower method.keep (1.0 keeps every token)"

    def __init__(self, layers: list[int], max_length: int, num_layers: int, keep: float,
                 target: float | None = None):
        super().__init__(layers, max_length)
        self.num_layers, self.target, self.keep = num_layers, target, keep
        self.register_buffer("counts", torch.empty(0, dtype=torch.long), persistent=False)
        # With a target, keep is solved from the training data (``calibrate``) and saved with the
        # model (float32: every device has it), so a reloaded model keeps what it was trained with.
        # NaN would read as damage in a weight file: "none solved" is a flag beside it.
        self.register_buffer("solved_keep", torch.tensor(0.0))
        self.register_buffer("keep_solved", torch.tensor(False))
        self.register_load_state_dict_post_hook(lambda module, _: module._schedule())
        self._schedule()

    @classmethod
    def check(cls, cfg) -> None:
        keep = cfg.method.keep
        if not is_number(keep) or not 0 < keep <= 1:
            raise DynbertError(f"method.keep={keep} is not valid: pass the fraction of tokens the last layer "
                               "keeps, a number in (0, 1], e.g. method.keep=0.5")

    @classmethod
    def from_config(cls, method_cfg, layers, max_length, encoder) -> TopK:
        return cls(layers, max_length, encoder.dims.num_layers, keep=method_cfg.keep, target=method_cfg.get("target"))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A model saved before solved_keep was saved with it trained with the config's keep.
        state_dict.setdefault(f"{prefix}solved_keep", self.solved_keep)
        state_dict.setdefault(f"{prefix}keep_solved", self.keep_solved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _schedule(self) -> None:
        """The per-layer fractions and count tables of the keep in use: the config's, or the solved one."""
        if self.keep_solved:
            self.keep = float(self.solved_keep)
        self.fractions = self.schedule_fractions()
        self.counts = torch.stack([keep_counts(f, self.max_length) for f in self.fractions]).to(self.counts.device)

    def schedule_fractions(self) -> list[float]:
        """f_l for each pruned layer: top-k's line from 1 down to ``keep`` (``keep_fractions``)."""
        return keep_fractions(self.layers, self.num_layers, self.keep)

    def calibrate(self, lengths: list[int], dims: EncoderDims) -> None:
        if self.target is not None:
            self.solved_keep.fill_(keep_for_target(self.target, lengths, self.layers, dims))
            self.keep_solved.fill_(True)
            self._schedule()

    def ranking(self, row: int, tokens: LayerTokens) -> torch.Tensor:
        """What the tokens are ranked by (higher is kept first)."""
        return tokens.score

    def keep_weights(self, state, row: int, tokens: LayerTokens, hard: bool) -> torch.Tensor:
        rank = rank_tokens(self.ranking(row, tokens), tokens.alive)
        counts = self.counts[row][tokens.num_tokens]
        return (rank < counts[:, None]).to(tokens.score.dtype)

    def keeps_all(self, state, row: int, length: int) -> bool:
        return self.fractions[row] >= 1

    def export_rule(self, state) -> dict:
        return dict(rule="length_table", counts=self.counts.tolist())
