"""Token gates, the bi-modal regularizer and physical token pruning for BERT.

The one shared core of dynbert (METHOD.md §1-4). Tensors in, tensors out: no files, no config,
no printing. It wraps a Hugging Face ``BertForSequenceClassification`` and reuses its embeddings,
attention projections, feed-forward blocks, pooler and classifier; only the order of calls and
the attention kernel (registered through transformers' ``AttentionInterface``) are ours.

Soft mode (training): the token at rank j of gated layer l is scaled by g[l, j] after attention,
and, with ``mask_attention``, later layers add log(prod of its gates) to its attention logits, so
a gate of 0 removes the token as a key exactly as gathering does. Hard mode (inference): tokens
whose rank has g >= 0.5 are kept and physically gathered; the sequence gets shorter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface, BertForSequenceClassification
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SCORES = ("attention_received", "cls_attention")
PARAMETRIZATIONS = ("clip", "sigmoid")
LAYER_WEIGHTINGS = ("linear", "none")
SPARSITY_TARGETS = ("ranks", "tokens")
BIMODAL_SCHEDULES = ("hold", "constant")

# A nearly closed token's key gets at least log(1e-6) added to its logits; log(clamp) has no
# gradient once clamped, so a closed token stays closed. A gate of exactly 0 blocks the key
# outright, as gathering does: with peaked attention even a 1e-6 weight can leak.
_LOG_FLOOR = 1e-6
_SIGMOID_INIT = 3.0


def _dynbert_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       token_score=None, score_queries=None, **kwargs):
    """transformers attention kernel that also returns a per-token score.

    Without ``token_score`` it is transformers' own sdpa. With ``attention_received`` it needs the
    probabilities, so it runs eagerly; with ``cls_attention`` it keeps sdpa and adds one row of
    logits for the CLS query. Scores are taken before dropout and summed over heads and over the
    queries in ``score_queries`` (the tokens still present), so soft and hard mode rank alike.
    """
    if token_score is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, is_causal=False)
    if token_score == "attention_received":
        probs = torch.softmax(torch.matmul(query, key.transpose(2, 3)) * scaling + attention_mask, dim=-1)
        output = torch.matmul(F.dropout(probs, p=dropout, training=module.training), value)
        with torch.no_grad():
            score = (probs * score_queries[:, None, :, None]).sum(dim=(1, 2))
        return output.transpose(1, 2).contiguous(), score
    if token_score == "cls_attention":
        output, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                           dropout=dropout, scaling=scaling, is_causal=False)
        with torch.no_grad():
            cls_logits = torch.matmul(query[:, :, :1], key.transpose(2, 3)) * scaling + attention_mask
            score = torch.softmax(cls_logits, dim=-1).sum(dim=(1, 2))
        return output, score
    raise ValueError(f"unknown gate score {token_score!r}; expected one of {SCORES}")


AttentionInterface.register("dynbert", _dynbert_attention)
# The wrapped model's own forward (HF's) must still build padding masks under our kernel's name.
AttentionMaskInterface.register("dynbert", sdpa_mask)


class TokenGates(nn.Module):
    """One trainable gate per (gated layer, rank); rank 0 is CLS, whose gate is fixed at 1."""

    def __init__(self, num_gated_layers: int, max_length: int, parametrization: str = "clip",
                 monotone: bool = False):
        super().__init__()
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"unknown gate parametrization {parametrization!r}; expected one of {PARAMETRIZATIONS}")
        self.parametrization = parametrization
        self.monotone = monotone
        init = 1.0 if parametrization == "clip" else _SIGMOID_INIT
        self.raw = nn.Parameter(torch.full((num_gated_layers, max_length), init))

    def forward(self) -> torch.Tensor:
        """Gate values in [0, 1], shape (gated layers, max_length)."""
        gates = self.raw.clamp(0.0, 1.0) if self.parametrization == "clip" else torch.sigmoid(self.raw)
        gates = torch.cat([torch.ones_like(gates[:, :1]), gates[:, 1:]], dim=1)
        if self.monotone:
            gates = torch.cummin(gates, dim=1).values
        return gates

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp clip gates back into [0, 1] after an optimizer step (projected gradient).

        Clamping only in the forward pass would let raw values leave [0, 1] and lose their gradient.
        """
        if self.parametrization == "clip":
            self.raw.clamp_(0.0, 1.0)

    @torch.no_grad()
    def harden_(self) -> None:
        """Make every gate exactly 0 or 1 (g >= 0.5 opens), so soft mode equals hard mode."""
        is_open = self().ge(0.5)
        if self.parametrization == "clip":
            self.raw.copy_(is_open.float())
        else:
            self.raw.copy_(torch.where(is_open, math.inf, -math.inf))


@dataclass
class GatedOutput:
    logits: torch.Tensor
    """(batch, num_labels)."""
    num_tokens: torch.Tensor
    """(batch,) real tokens of each input, CLS and SEP included."""
    kept: torch.Tensor
    """(batch, num_layers) tokens still present after each layer's gate (non-increasing)."""
    present: torch.Tensor
    """(batch, num_layers, input length) bool: which original positions survive each layer."""
    kept_soft: torch.Tensor | None = None
    """Soft mode: (batch, gated layers) the expected fraction of each input's tokens kept after each
    gated layer (the sum of the tokens' cumulative gates over their count); differentiable. The
    FLOPs of the following layers scale with it."""


class GatedBert(nn.Module):
    """A BERT classifier with trainable token gates after the attention of chosen layers."""

    def __init__(self, model: BertForSequenceClassification, max_length: int,
                 gate_layers: list[int] | None = None, score: str = "attention_received",
                 parametrization: str = "clip", mask_attention: bool = True, monotone: bool = False):
        super().__init__()
        num_layers = model.config.num_hidden_layers
        gate_layers = list(range(num_layers)) if gate_layers is None else sorted(set(gate_layers))
        bad = [layer for layer in gate_layers if not 0 <= layer < num_layers]
        if bad:
            raise ValueError(f"gate layer(s) {bad} out of range: the model has layers 0..{num_layers - 1}")
        if score not in SCORES:
            raise ValueError(f"unknown gate score {score!r}; expected one of {SCORES}")
        if max_length > model.config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds the model's "
                             f"{model.config.max_position_embeddings} positions")
        model.config._attn_implementation = "dynbert"
        self.model = model
        self.max_length = max_length
        self.gate_layers = gate_layers
        self.score = score
        self.mask_attention = mask_attention
        self.gates = TokenGates(len(gate_layers), max_length, parametrization, monotone)
        self._gate_row = {layer: row for row, layer in enumerate(gate_layers)}

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, hard: bool = False) -> GatedOutput:
        bert = self.model.bert
        batch, length = input_ids.shape
        if length > self.max_length:
            raise ValueError(f"input length {length} exceeds the gates' max_length {self.max_length}")
        hidden = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        real = attention_mask.bool()
        num_tokens = real.sum(dim=1)
        # `alive`: the tokens hard mode would still hold. Soft mode carries it to rank tokens the
        # way hard mode does, and the running product of each token's gates, whose log masks the
        # token as a key, so gates below 0.5 still get gradient.
        alive = real
        kept_weight = real.to(hidden.dtype)
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        if hard:  # columns that are padding in every example cost time, not FLOPs: drop them now
            hidden, real, positions = _gather_kept(hidden, real, positions)
            alive, kept_weight = real, real.to(hidden.dtype)
        gates = self.gates() if self.gate_layers else None
        # Hard mode: a gated layer whose leading open ranks cover every token still present keeps
        # them all, so it need not score, rank or gather (scoring forces eager attention).
        open_ranks = _leading_open(gates) if hard and gates is not None else None
        kept_counts, present_per_layer, kept_soft = [], [], []

        for index, layer in enumerate(bert.encoder.layer):
            row = self._gate_row.get(index)
            if row is not None and open_ranks is not None and open_ranks[row] >= hidden.size(1):
                row = None
            bias = self._attention_bias(real, kept_weight, hidden.dtype)
            score_kwargs = {}
            if row is not None:
                score_kwargs = dict(token_score=self.score, score_queries=alive.to(hidden.dtype))
            attended, score = layer.attention(hidden, bias, **score_kwargs)

            if row is not None:
                rank = _rank_tokens(score, alive)
                token_gate = gates[row].gather(0, rank.flatten()).view_as(rank)
                token_gate = torch.where(rank == 0, torch.ones_like(token_gate), token_gate)
                keep = alive & (token_gate >= 0.5)
                if hard:
                    attended, alive, positions = _gather_kept(attended, keep, positions)
                    real = alive
                    kept_weight = alive.to(hidden.dtype)
                else:
                    attended = attended * token_gate.unsqueeze(-1)
                    kept_weight = kept_weight * token_gate
                    alive = keep
                    kept_soft.append(kept_weight.sum(dim=1) / num_tokens)
            hidden = layer.feed_forward_chunk(attended)
            kept_counts.append(alive.sum(dim=1))
            present_per_layer.append(_scatter_present(alive, positions, length))

        pooled = bert.pooler(hidden)
        logits = self.model.classifier(self.model.dropout(pooled))
        return GatedOutput(logits=logits, num_tokens=num_tokens, kept=torch.stack(kept_counts, dim=1),
                           present=torch.stack(present_per_layer, dim=1),
                           kept_soft=torch.stack(kept_soft, dim=1) if kept_soft else None)

    def _attention_bias(self, real, kept_weight, dtype) -> torch.Tensor:
        """Additive attention bias (batch, 1, 1, keys): -inf-like for pads, log of gates else."""
        blocked = torch.finfo(dtype).min
        if self.mask_attention:
            bias = torch.where(real & (kept_weight > 0), torch.log(kept_weight.clamp(min=_LOG_FLOOR)), blocked)
        else:
            bias = torch.where(real, 0.0, blocked).to(dtype)
        return bias[:, None, None, :]


@torch.no_grad()
def _leading_open(gates: torch.Tensor) -> list[int]:
    """Per gated layer, how many ranks from the first are open (g >= 0.5) before one is closed."""
    closed = gates < 0.5
    return torch.where(closed.any(dim=1), closed.int().argmax(dim=1), gates.size(1)).tolist()


@torch.no_grad()
def _rank_tokens(score: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Rank of each token: CLS first, then present tokens by score, then dropped tokens and pads."""
    order_key = torch.where(present, score, -1.0)
    order_key[:, 0] = math.inf
    order = torch.argsort(order_key, dim=1, descending=True, stable=True)
    return torch.argsort(order, dim=1)


def _gather_kept(hidden, keep, positions):
    """Physically drop tokens: gather the kept ones in their original order, pad to the longest."""
    new_length = int(keep.sum(dim=1).max())
    index = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :new_length]
    hidden = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
    return hidden, keep.gather(1, index), positions.gather(1, index)


def _scatter_present(present, positions, length) -> torch.Tensor:
    """Map the current (possibly gathered) tokens back to a mask over the original positions."""
    original = torch.zeros(present.size(0), length, dtype=torch.bool, device=present.device)
    return original.scatter(1, positions, present)


# ---------------------------------------------------------------------------------------------
# Regularizer (METHOD.md §2)


@dataclass
class RegularizerParts:
    sparsity: torch.Tensor
    """λ · Σ_l w_l · mean_j g_lj."""
    bimodal: torch.Tensor
    """μ · Σ_l mean_j g_lj (1 - g_lj)."""

    @property
    def total(self) -> torch.Tensor:
        return self.sparsity + self.bimodal


def layer_weights(gate_layers: list[int], num_layers: int, weighting: str = "linear") -> torch.Tensor:
    """w_l = l / L (1-based), so deeper layers pay more for each kept token; or all 1."""
    if weighting not in LAYER_WEIGHTINGS:
        raise ValueError(f"unknown layer weighting {weighting!r}; expected one of {LAYER_WEIGHTINGS}")
    if weighting == "none":
        return torch.ones(len(gate_layers))
    return torch.tensor([(layer + 1) / num_layers for layer in gate_layers])


def gate_regularizer(gates: torch.Tensor, weights: torch.Tensor, lam: float, mu: float,
                     kept_soft: torch.Tensor | None = None) -> RegularizerParts:
    """Sparsity (L1, weighted by depth) plus the bi-modal term g(1 - g) on every gate but CLS's.

    Without ``kept_soft`` (``gate.sparsity: ranks``, PoWER-BERT's L1) the sparsity is the mean gate
    value over all ranks, so ranks that short inputs never reach count as much as the ones they
    use. With ``kept_soft`` (``tokens``) it is the batch's mean expected kept fraction after each
    gated layer: only real tokens count, a gate counts as often as it is used, and closing a token
    early also lowers every later layer's term, as it lowers their FLOPs.
    """
    free = gates[:, 1:]
    kept = free.mean(dim=1) if kept_soft is None else kept_soft.mean(dim=0)
    sparsity = lam * (weights.to(kept) * kept).sum()
    bimodal = mu * (free * (1.0 - free)).mean(dim=1).sum()
    return RegularizerParts(sparsity=sparsity, bimodal=bimodal)


def bimodal_weight(progress: float, lam: float, scale: float, schedule: str = "hold") -> float:
    """μ at a point of training (progress in [0, 1]).

    ``hold``: 0 for the first 20% of steps, a linear ramp to scale·λ by 50%, then held. A constant
    μ >= λ·w_l from the start freezes the gates open (at g = 1 the bi-modal gradient pushes up).
    """
    if schedule not in BIMODAL_SCHEDULES:
        raise ValueError(f"unknown bimodal schedule {schedule!r}; expected one of {BIMODAL_SCHEDULES}")
    top = scale * lam
    if schedule == "constant":
        return top
    return top * min(max((progress - 0.2) / 0.3, 0.0), 1.0)


# ---------------------------------------------------------------------------------------------
# FLOPs (METHOD.md §4): matrix products only, FLOPs = 2 x MACs, per example on real tokens.


def flops_per_example(num_tokens: torch.Tensor, kept: torch.Tensor, hidden: int, intermediate: int,
                      num_labels: int) -> torch.Tensor:
    """Analytic FLOPs of each example for a kept-token schedule.

    Layer l with L_in tokens entering and L_out after its gate (the gate sits after attention):
    MAC = 4·D²·L_in (Q, K, V, O) + 2·D·L_in² (QKᵀ, AV) + 2·D·I·L_out (FFN). The pooler (D², CLS
    only) and classifier (D·C) are counted; embeddings are lookups, no matrix products.
    ``num_tokens``: (batch,); ``kept``: (batch, layers). Un-pruned: kept = num_tokens per layer.
    """
    tokens_out = kept.double()
    tokens_in = torch.cat([num_tokens.double()[:, None], tokens_out[:, :-1]], dim=1)
    macs = (4 * hidden**2 * tokens_in + 2 * hidden * tokens_in**2 + 2 * hidden * intermediate * tokens_out)
    macs = macs.sum(dim=1) + hidden * hidden + hidden * num_labels
    return 2 * macs


def baseline_kept(num_tokens: torch.Tensor, num_layers: int) -> torch.Tensor:
    """The un-pruned schedule: every layer keeps every real token."""
    return num_tokens[:, None].expand(-1, num_layers)


def _register_cpu_sdpa_flops() -> None:
    """FlopCounterMode knows the CUDA sdpa kernels but not the CPU one; count it the same way."""
    from torch.utils import flop_counter

    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if cpu_sdpa in flop_counter.flop_registry or cpu_sdpa.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(cpu_sdpa)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def count_matmul_flops(fn, *args, **kwargs) -> int:
    """FLOPs of the matrix products that ``fn(*args, **kwargs)`` runs, from torch's own counter.

    Runs under ``no_grad`` (the counter sees nothing under ``inference_mode``).
    """
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()
