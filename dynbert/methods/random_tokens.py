"""Random: top-k's keep schedule with the kept tokens drawn at random (CLS always kept).

The floor every method must beat: it prunes exactly as many tokens as ``topk`` at the same
``keep`` and knows nothing about which matter. In training each step draws fresh random ranks. In
evaluation the ranks are a hash of (seed, layer, original position, token id), so soft mode and
the gathered model drop the same tokens, and the same input always loses the same tokens.
"""

from __future__ import annotations

import torch

from .. import export_modeling
from ..core import LayerTokens
from . import register
from .topk import TopK

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so int64 never overflows.
_MULTIPLIERS = (0x7FEB352D, 0x5BD1E995)


def _mix(value: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash step (xor-shift-multiply), on int64 tensors holding 32-bit values."""
    for multiplier in _MULTIPLIERS:
        value = ((value ^ (value >> 16)) * multiplier) & _MASK32
    return value ^ (value >> 16)


def token_hash(seed: int, layer: int, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """A pseudo-random value in [0, 1) for each token, a function of its four arguments only.

    24 bits of the hash, so float32 holds it exactly (MPS has no float64); two tokens that tie
    rank in their original order, in soft mode and gathered alike.
    """
    state = _mix(torch.tensor((seed * 1_000_003 + layer) & _MASK32, dtype=torch.long, device=positions.device))
    state = _mix(state ^ positions.long())
    return (_mix(state ^ token_ids.long()) >> 8).float() / 2**24


@register
class RandomTokens(TopK):
    """Top-k's schedule, random tokens: deterministic in evaluation, fresh in every training step."""

    name = "random"
    score = "cls_attention"
    """Random ranks need no score, but the engine computes one per pruned layer: the cheapest."""

    def __init__(self, layers: list[int], max_length: int, num_layers: int, keep: float, seed: int,
                 target: float | None = None):
        super().__init__(layers, max_length, num_layers, keep, target)
        self.seed = seed

    @classmethod
    def from_config(cls, method_cfg, layers, max_length, encoder) -> RandomTokens:
        return cls(layers, max_length, encoder.dims.num_layers, keep=method_cfg.keep, seed=method_cfg.seed,
                   target=method_cfg.get("target"))

    def ranking(self, row: int, tokens: LayerTokens) -> torch.Tensor:
        if self.training:
            return torch.rand(tokens.alive.shape, device=tokens.alive.device)
        token_ids = tokens.input_ids.gather(1, tokens.positions)
        return token_hash(self.seed, self.layers[row], tokens.positions, token_ids)

    def export_rule(self, state) -> dict:
        # The same hash in the exported model: its state per layer, the tokens' part computed there.
        return dict(rule="random", score=None, counts=self.counts.tolist(),
                    hash_states=[export_modeling.hash_state(self.seed, layer) for layer in self.layers])
