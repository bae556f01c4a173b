"""ToMe, token merging (Bolya et al., ICLR 2023, "Token Merging: Your ViT But Faster"): tokens are
combined, not dropped, on top-k's fixed schedule.

Each pruned layer, after attention, runs their bipartite soft matching on the tokens present: in
order, they alternate between set A (CLS and every second token) and set B; each A token's most
similar B token is found (cosine similarity), and the r A tokens with the most similar partners
are merged into them, CLS never. A merge is the size-weighted average

    x_b ← (s_b·x_b + Σ s_a·x_a) / (s_b + Σ s_a),        s_b ← s_b + Σ s_a

where s counts the input tokens a token stands for (1 at the start). Later layers add log(s) to
each token's attention logits (their proportional attention), so a merged token is attended as its
s copies would be. r follows top-k's schedule (``topk.py``): a layer leaves ⌈f_l·n⌉ tokens,
f_l = 1 − (1 − keep)·(l + 1)/L; a layer merges at most the A tokens other than CLS (about half the
tokens present, as in ToMe), so a steep schedule may leave more. Nothing is learned; the model is
fine-tuned with the schedule in place from ``method.start`` (0: the first step).

Similarity is measured on the attention sub-layer's output, the vectors that are merged, not on
the attention keys ToMe uses (their ablation found keys a little better): the kernel returns a
per-token score, not the keys, and the engine hands every method these vectors
(``LayerTokens.hidden``), so ToMe needs no change to the kernel or the adapters. The matching's
matrix product (⌈m/2⌉·⌊m/2⌋·D multiply-accumulates for m tokens present) is not in the engine's
FLOPs count, which counts layers by their token counts (``core.flops_per_example``): under 0.2% of
a bert-base layer at 64 tokens (``matching_macs``).

Soft mode (training) merges exactly as hard mode does, in place: the merged A tokens get weight 0
(the engine zeroes them and blocks them as keys) and the sequence keeps its length, so soft and
hard mode compute the same model; the gradient flows through the averages, not the matching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..checks import check_fraction
from ..core import LayerTokens, gather_tokens
from ..errors import DynbertError
from . import register
from .topk import TopK


@dataclass
class Matching:
    """One layer's merges, over the (batch, length) tokens entering it."""

    merged: torch.Tensor
    """(batch, length) bool: the A tokens merged away."""
    destination: torch.Tensor
    """(batch, length) long: the index each token's vector goes to (its partner if merged, else itself)."""
    present: torch.Tensor
    """(batch, length) bool: the tokens present before the merge."""


def bipartite_matching(metric: torch.Tensor, present: torch.Tensor, merges: torch.Tensor) -> Matching:
    """ToMe's bipartite soft matching of the ``present`` tokens of ``metric`` (batch, length, D),
    merging ``merges`` (batch,) A tokens of each row (at most its A tokens other than CLS).

    The present tokens, in order, alternate A, B, A, ... (CLS, the first, is in A and never merged).
    Each A token's partner is its most cosine-similar B token; the A tokens with the most similar
    partners merge (ties: the earlier first).
    """
    batch, length, dim = metric.shape
    with torch.no_grad():
        order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)  # present first, in order
        count = present.sum(dim=1)
        ranks = torch.arange(length, device=metric.device)
        index_a, index_b = order[:, 0::2], order[:, 1::2]
        valid_a = ranks[0::2][None, :] < count[:, None]
        valid_b = ranks[1::2][None, :] < count[:, None]
        unit = F.normalize(metric.float(), dim=-1)
        a = unit.gather(1, index_a[..., None].expand(-1, -1, dim))
        b = unit.gather(1, index_b[..., None].expand(-1, -1, dim))
        similarity = (a @ b.transpose(1, 2)).masked_fill(~valid_b[:, None, :], -torch.inf)
        best, partner = similarity.max(dim=-1)  # (batch, A) each A token's most similar B token
        best = best.masked_fill(~valid_a, -torch.inf)
        best[:, 0] = -torch.inf  # CLS
        edge_rank = torch.argsort(torch.argsort(best, dim=1, descending=True, stable=True), dim=1)
        mergeable = torch.clamp(valid_a.sum(dim=1) - 1, min=0) * (valid_b.sum(dim=1) > 0)
        chosen = (edge_rank < torch.minimum(merges.clamp(min=0), mergeable)[:, None]) & valid_a
        chosen[:, 0] = False
        merged = torch.zeros_like(present).scatter(1, index_a, chosen)
        destination = ranks.expand(batch, length).clone()
        destination = destination.scatter(1, index_a, torch.where(chosen, index_b.gather(1, partner), index_a))
    return Matching(merged=merged, destination=destination, present=present)


def merge_tokens(hidden: torch.Tensor, sizes: torch.Tensor, matching: Matching) -> tuple[torch.Tensor, torch.Tensor]:
    """The size-weighted averages of ``matching``: (hidden, sizes), the merged A tokens' sizes 0
    (their vectors are left as they were: the engine drops or masks them). Tokens that receive no
    merge keep their vectors bit for bit."""
    destination = matching.destination
    weighted = hidden.float() * sizes[..., None]
    totals = torch.zeros_like(weighted).scatter_add(1, destination[..., None].expand_as(weighted), weighted)
    new_sizes = torch.zeros_like(sizes).scatter_add(1, destination, sizes)
    receives = torch.zeros_like(destination).scatter_add(1, destination, matching.merged.long()) > 0
    averaged = (totals / new_sizes.clamp(min=1)[..., None]).to(hidden.dtype)
    return torch.where(receives[..., None], averaged, hidden), new_sizes


def matching_macs(tokens: torch.Tensor, hidden: int) -> torch.Tensor:
    """Multiply-accumulates of one layer's matching for ``tokens`` present (the A·Bᵀ similarity),
    which the engine's FLOPs count leaves out."""
    return torch.div(tokens + 1, 2, rounding_mode="floor") * torch.div(tokens, 2, rounding_mode="floor") * hidden


@register
class TokenMerging(TopK):
    """Top-k's schedule of token counts, reached by merging similar tokens instead of dropping any."""

    name = "tome"
    # ToMe needs no score; the kernel computes one for every pruned layer, and this is the cheapest.
    score = "cls_attention"
    never_pruned_advice = "lower method.keep (1.0 merges nothing)"

    def __init__(self, layers: list[int], max_length: int, num_layers: int, keep: float, start: float = 0.0):
        super().__init__(layers, max_length, num_layers, keep)
        self.start = start
        self.merging = True
        """False before ``method.start`` (``begin_step``); it only holds in training: evaluation, and a
        loaded model, always merge."""

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        check_fraction(cfg, "method.start", "the fraction of training before tokens are merged")

    @classmethod
    def from_config(cls, method_cfg, layers, max_length, encoder) -> TokenMerging:
        return cls(layers, max_length, encoder.dims.num_layers, keep=method_cfg.keep,
                   start=method_cfg.get("start", 0.0))

    def begin_step(self, step: int, total_steps: int) -> None:
        self.merging = step >= self.start * total_steps

    def prepare(self, hard: bool) -> dict:
        return {}  # each pruned layer's Matching, from keep_weights to reduce

    def waiting(self) -> bool:
        """Training before ``method.start``: nothing merges yet."""
        return self.training and not self.merging

    def keeps_all(self, state, row: int, length: int) -> bool:
        return self.waiting() or super().keeps_all(state, row, length)

    def keep_weights(self, state, row: int, tokens: LayerTokens, hard: bool) -> torch.Tensor:
        if self.waiting():
            return torch.ones_like(tokens.score)
        present = tokens.alive.sum(dim=1)
        merges = present - self.counts[row][tokens.num_tokens]
        state[row] = bipartite_matching(tokens.hidden, tokens.alive, merges)
        return (~state[row].merged).to(tokens.score.dtype)

    def reduce(self, state, row, hidden, keep, positions, sizes, hard):
        matching = state.get(row)
        if matching is None:  # nothing merged at this layer
            return super().reduce(state, row, hidden, keep, positions, sizes, hard)
        if sizes is None:
            sizes = matching.present.to(torch.float)
        hidden, sizes = merge_tokens(hidden, sizes, matching)
        if not hard:
            return hidden, keep, positions, sizes
        return gather_tokens(hidden, keep, positions, sizes)

    def export_rule(self, state) -> dict:
        raise DynbertError("method tome merges tokens, which the export's modeling file cannot express (it only "
                           "drops them): use this run with `dynbert predict`")
