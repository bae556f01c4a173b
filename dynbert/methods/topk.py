"""Top-k: a fixed keep schedule, the tokens that receive the most attention kept (a baseline).

The fraction of each input's tokens kept after encoder layer l (0-based, L layers) falls linearly
from 1 to ``keep`` at the last layer:

    f_l = 1 − (1 − keep) · (l + 1) / L,        k_l = ⌈f_l · n⌉

with n the input's real tokens, CLS counted. A pruned layer keeps CLS and the k_l − 1 present
tokens that receive the most attention (summed over heads and present queries), in their original
order. The decisions are always 0/1, so training (soft mode) computes exactly what the gathered
model does; the model is fine-tuned with the schedule in place from the first step.
"""

from __future__ import annotations

import math

import torch

from ..core import LayerTokens, TokenPruner, rank_tokens

# f_l · n is computed in floating point: 0.7 · 10 must keep 7 tokens, not ⌈7.000000000000001⌉ = 8.
_CEIL_SLACK = 1e-9


def keep_fractions(layers: list[int], num_layers: int, keep: float) -> list[float]:
    """f_l for each pruned layer: 1 − (1 − keep)·(l + 1)/L, so the last layer keeps ``keep``."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep={keep} must be a fraction in (0, 1]")
    return [1.0 - (1.0 - keep) * (layer + 1) / num_layers for layer in layers]


def keep_counts(fraction: float, max_length: int) -> torch.Tensor:
    """k = ⌈fraction · n⌉, at least 1 (CLS), for every length n = 0..max_length (index by n).

    A table computed once in double precision on the CPU: on the device a lookup is exact on
    every backend (MPS has no float64) and costs no synchronisation.
    """
    return torch.tensor([max(1, math.ceil(fraction * n - _CEIL_SLACK)) for n in range(max_length + 1)])


class TopK(TokenPruner):
    """A fixed keep schedule; each pruned layer keeps the top-k tokens by attention received."""

    name = "topk"
    never_pruned_advice = "lower method.keep (1.0 keeps every token)"

    def __init__(self, layers: list[int], max_length: int, num_layers: int, keep: float):
        super().__init__(layers, max_length)
        self.keep = keep
        self.fractions = keep_fractions(layers, num_layers, keep)
        self.register_buffer("counts", torch.stack([keep_counts(f, max_length) for f in self.fractions]),
                             persistent=False)

    def knob_active(self, lam: float) -> bool:
        return self.keep < 1

    def ranking(self, row: int, tokens: LayerTokens) -> torch.Tensor:
        """What the tokens are ranked by (higher is kept first)."""
        return tokens.score

    def token_weights(self, values, row: int, tokens: LayerTokens, hard: bool) -> torch.Tensor:
        rank = rank_tokens(self.ranking(row, tokens), tokens.alive)
        counts = self.counts[row][tokens.num_tokens]
        return (rank < counts[:, None]).to(tokens.score.dtype)

    def keeps_all(self, values, row: int, length: int) -> bool:
        return self.fractions[row] >= 1
