"""The pruning engine: score tokens, let a method decide which to keep, physically remove the rest.

The one shared core of dynbert (METHOD.md §1-4). Tensors in, tensors out: no files, no config, no
printing. ``GatedModel`` runs any encoder family through its adapter (``encoders/``) and any
token-pruning method through ``TokenPruner`` (``methods/``); neither knows about the other.

In each pruned layer, after self-attention, the kernel scores every token (the attention it
receives, or the CLS query's), and the method turns scores into keep weights in [0, 1]. Soft mode
(training): the token's attention output is scaled by its weight and, with ``mask_attention``,
later layers add log(product of its weights) to its attention logits, so a weight of 0 removes
the token as a key exactly as gathering does. Hard mode (inference): tokens with weight >= 0.5
are kept and physically gathered; the sequence gets shorter, so later layers cost less. That
step is the method's ``reduce`` hook: by default the gather, while a merging method (``tome``)
combines tokens there and returns each token's size, which later layers add as log(size) to its
attention logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .encoders import EncoderAdapter, EncoderDims, adapter_for

if TYPE_CHECKING:  # a method's config, read by its own class; the engine takes no config
    from omegaconf import DictConfig

SCORES = ("attention_received", "cls_attention")
DECIDED_MARGIN = 0.05
"""A keep weight within this distance of 0 or 1 counts as decided (``GatedOutput.decided``)."""

# A nearly closed token's key gets at least log(1e-6) added to its logits; log(clamp) has no
# gradient once clamped, so a closed token stays closed. A weight of exactly 0 blocks the key
# outright, as gathering does: with peaked attention even a 1e-6 weight can leak.
_LOG_FLOOR = 1e-6


def _dynbert_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       token_score=None, score_queries=None, **kwargs):
    """transformers attention kernel that also returns a per-token score.

    Without ``token_score`` it is transformers' own sdpa. With ``attention_received`` it needs the
    probabilities, so it runs eagerly; with ``cls_attention`` it keeps sdpa and adds one row of
    logits for the CLS query. Scores are taken before dropout and summed over heads and over the
    queries in ``score_queries`` (the tokens still present), so soft and hard mode rank alike.
    ``attention_received`` keeps its gradient, so a method can learn through the score itself (LTP's
    soft mask does, as in its public code); ranking methods use it under ``no_grad`` and pay nothing.
    """
    if token_score is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, is_causal=False)
    if token_score == "attention_received":
        probs = torch.softmax(torch.matmul(query, key.transpose(2, 3)) * scaling + attention_mask, dim=-1)
        output = torch.matmul(F.dropout(probs, p=dropout, training=module.training), value)
        score = (probs * score_queries[:, None, :, None]).sum(dim=(1, 2))
        return output.transpose(1, 2).contiguous(), score
    if token_score == "cls_attention":
        output, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                           dropout=dropout, scaling=scaling, is_causal=False)
        with torch.no_grad():  # the CLS query's row of the bias (an adapter's bias may differ per query)
            cls_logits = torch.matmul(query[:, :, :1], key.transpose(2, 3)) * scaling + attention_mask[:, :, :1]
            score = torch.softmax(cls_logits, dim=-1).sum(dim=(1, 2))
        return output, score
    raise ValueError(f"unknown token score {token_score!r}; expected one of {SCORES}")


AttentionInterface.register("dynbert", _dynbert_attention)
# The wrapped model's own forward (HF's) must still build padding masks under our kernel's name.
AttentionMaskInterface.register("dynbert", sdpa_mask)


# ---------------------------------------------------------------------------------------------
# The method interface


@dataclass
class LayerTokens:
    """What a method sees of the tokens entering one pruned layer (current, possibly gathered)."""

    score: torch.Tensor
    """(batch, length) the kernel's score; 0 for padding."""
    alive: torch.Tensor
    """(batch, length) bool: tokens still present (hard mode would still hold them)."""
    positions: torch.Tensor
    """(batch, length) each token's position in the original input."""
    input_ids: torch.Tensor
    """(batch, input length) the original token ids."""
    num_tokens: torch.Tensor
    """(batch,) real tokens of each original input."""
    hidden: torch.Tensor | None = None
    """(batch, length, hidden) the attention sub-layer's output, the vectors the layer keeps or drops
    (a merging method compares them)."""


@dataclass
class RegularizerParts:
    sparsity: torch.Tensor
    """The pull towards fewer kept tokens (λ times the method's measure of what is kept)."""
    bimodal: torch.Tensor
    """The push of soft decisions towards 0 or 1 (zero for methods without one)."""

    @property
    def total(self) -> torch.Tensor:
        return self.sparsity + self.bimodal


class TokenPruner(nn.Module):
    """A token-pruning method: which tokens each pruned layer keeps, and how that is learned.

    A method is a subclass registered with ``methods.register`` under its ``name``, and a YAML,
    ``conf/method/<name>.yaml``, naming it (``declarations.py``). It implements ``from_config`` and
    ``keep_weights``, and ``check`` when it has keys of its own; the rest has working defaults. The
    engine, the loop, evaluation, checkpoints, sweeps and reports only ever call these.
    """

    name: str
    """The name it is registered, run and reported under (``method=<name>``, ``method.name``)."""
    score = "attention_received"
    """The token score the attention kernel computes for this method's layers."""
    never_pruned_advice = "train longer (train.epochs), or turn the method's knob towards pruning more"
    """What a run that pruned nothing should try (printed with its warning)."""
    undecided_advice = "train longer (train.epochs)"
    """What a run whose soft decisions did not end at 0 or 1 should try."""
    idle_parameters = False
    """True when some stage leaves the method's parameters out of the loss (frozen thresholds, a
    fixed retention): with several processes, DDP must then look for unused parameters."""

    def __init__(self, layers: list[int], max_length: int):
        super().__init__()
        self.layers = list(layers)
        self.max_length = max_length
        self.row = {layer: row for row, layer in enumerate(self.layers)}
        self.flops_target = None
        """A ``methods.target.FlopsTarget`` when the run asked for a FLOPs ratio (``method.target``)
        instead of a λ: its target and learned multiplier go into metrics.json. (An instance
        attribute: a class attribute would hide the submodule a method sets here.)"""

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        """Refuse, in one sentence (``checks.py``), a value of this method's own ``method.*`` keys it
        cannot run with. ``cfg`` is the whole run config (a limit may depend on λ). Called when the
        config is composed, before any work; the engine's keys (``method.layers``, ``method.target``,
        ``method.mask_attention``) are checked by ``config.validate``."""

    @classmethod
    def from_config(cls, method_cfg: DictConfig, layers: list[int], max_length: int,
                    encoder: EncoderAdapter) -> TokenPruner:
        """The method ``method_cfg`` (a run's ``method`` config) asks for, pruning ``layers`` of
        ``encoder``'s model. A key added since a run folder was written is absent from its
        config.yaml: take the value that run trained with, so the folder still loads."""
        raise NotImplementedError

    def calibrate(self, lengths: list[int], dims: EncoderDims) -> None:
        """Before training: fit what the method derives from the training inputs' lengths (``lengths``,
        tokens per example) and the encoder's sizes, e.g. the keep schedule that meets a FLOPs target."""

    def settle(self, step: int, total_steps: int, hard_ratio) -> str | None:
        """Before optimizer step ``step`` (``total_steps``: after the last), with a FLOPs target: where
        decisions that depend on the scores, not only on the lengths (LTP's thresholds), freeze, fit
        them to cost the target on the inputs ``method.target_inputs`` names. ``hard_ratio()``: hard mode's FLOPs ratio on those inputs now,
        one pass over them. Returns what it did, for train.log (None: nothing)."""
        return None

    def prepare(self, hard: bool):
        """The method's state for one forward (a gate table, thresholds: a small dataclass of its
        own), computed once before the layers run; ``keep_weights`` and ``keeps_all`` receive it."""
        return None

    def keep_weights(self, state, row: int, tokens: LayerTokens, hard: bool) -> torch.Tensor:
        """(batch, length) keep weights in [0, 1] at pruned layer ``row`` (the engine keeps CLS).

        Hard mode keeps weight >= 0.5. Soft mode scales tokens by it; weights already 0/1 make
        soft mode compute what hard mode does.
        """
        raise NotImplementedError

    def keeps_all(self, state, row: int, length: int) -> bool:
        """Hard mode: True when layer ``row`` certainly keeps every token of a ``length``-long
        (gathered) input, so it need not score, rank or gather (scoring forces eager attention)."""
        return False

    def reduce(self, state, row: int, hidden: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor,
               sizes: torch.Tensor | None, hard: bool):
        """The reduce step of pruned layer ``row``, after ``keep_weights``: (hidden, alive, positions, sizes).

        ``hidden``: (batch, length, D) the attention sub-layer's output; ``keep``: (batch, length) the
        tokens that stay (present and weight >= 0.5, CLS among them); ``sizes``: None, or (batch,
        length) how many original tokens each token stands for (0 for tokens gone and pads), which
        later layers add as log(size) to the token's attention logits. Hard mode (the default):
        gather the kept tokens in their original order (``gather_tokens``). Soft mode (the default):
        nothing moves; the engine then scales each token by its weight and masks it as a key.
        A merging method overrides this to combine tokens first and returns the sizes it tracks.
        """
        if not hard:
            return hidden, keep, positions, sizes
        return gather_tokens(hidden, keep, positions, sizes)

    def regularizer(self, out: GatedOutput, lam: float, step: int, total_steps: int) -> RegularizerParts | None:
        return None

    def param_groups(self) -> list[dict]:
        """Optimizer groups of the method's own parameters: params, lr, and ``schedule``, the
        factor on lr at each step (``schedule(step, total_steps)``)."""
        return []

    def schedule_warning(self, total_steps: int) -> str | None:
        """Why a run of ``total_steps`` optimizer steps can hardly prune, known before it trains
        (None: no such reason). Printed at the start and kept in metrics.json's warnings."""
        return None

    def begin_step(self, step: int, total_steps: int) -> None:
        """Called before every optimizer step (and once when resuming): stage changes go here."""

    def after_step(self) -> None:
        """Called after every optimizer step (projections go here)."""

    def harden_(self) -> None:
        """Make soft decisions exactly 0/1 (by the same rule hard mode uses), before evaluation."""

    def export_rule(self, state) -> dict | None:
        """What hard mode decides, as the plain values ``export_modeling.py`` reads (``rule``, one of
        its ``RULES``, and that rule's fields), from ``prepare(hard=True)``'s ``state``; None when
        the export's modeling file has no rule for this method (``export.pruning_rule``)."""
        return None


def rank_tokens(score: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Rank of each token: CLS first, then present tokens by score, then dropped tokens and pads."""
    with torch.no_grad():
        order_key = torch.where(present, score, -1.0)
        order_key[:, 0] = math.inf
        order = torch.argsort(order_key, dim=1, descending=True, stable=True)
        return torch.argsort(order, dim=1)


@dataclass
class GatedOutput:
    logits: torch.Tensor
    """(batch, num_labels)."""
    num_tokens: torch.Tensor
    """(batch,) real tokens of each input, CLS and SEP included."""
    kept: torch.Tensor
    """(batch, num_layers) tokens still present after each layer's decision (non-increasing)."""
    present: torch.Tensor
    """(batch, num_layers, input length) bool: which original positions survive each layer."""
    kept_soft: torch.Tensor | None = None
    """Soft mode: (batch, pruned layers) the expected fraction of each input's tokens kept after each
    pruned layer (the sum of the tokens' cumulative weights over their count); differentiable. The
    FLOPs of the following layers scale with it."""
    decided: torch.Tensor | None = None
    """Soft mode: (batch,) how many of the input's token decisions (a present token, CLS aside, at a
    pruned layer) had a weight within ``DECIDED_MARGIN`` of 0 or 1."""
    decisions: torch.Tensor | None = None
    """Soft mode: (batch,) how many token decisions there were."""
    keep_weights: torch.Tensor | None = None
    """Soft mode: (batch, pruned layers, input length) the keep weight each pruned layer gave each
    token (CLS 1, pads 0; not cumulative); differentiable. A regularizer on each layer's own
    decisions (LTP's) reads it."""
    flops_ratio_soft: torch.Tensor | None = None
    """Soft mode: () the batch's expected FLOPs ratio, the engine's count (``flops_per_example``) of
    the expected tokens after each layer (the sum of the tokens' cumulative weights); differentiable,
    so a method can hold it to a target. With 0/1 weights it is ``flops_ratio_hard``."""
    flops_ratio_hard: torch.Tensor | None = None
    """Soft mode: () the FLOPs ratio of the same batch with the decisions rounded (weight >= 0.5), as
    hard mode would run it; no gradient."""
    scores: torch.Tensor | None = None
    """Only with ``return_scores``: (batch, num_layers, input length) the score each original
    position was ranked by at each layer; NaN where the layer ranked nothing (it prunes nothing, or
    hard mode skipped it because it keeps every token) or the position was padding or already gone."""


class GatedModel(nn.Module):
    """A sequence classifier whose chosen layers drop tokens, as ``method`` decides."""

    def __init__(self, model: nn.Module, method: TokenPruner, mask_attention: bool = True,
                 encoder: EncoderAdapter | None = None):
        super().__init__()
        self.encoder = encoder or adapter_for(model)
        num_layers = self.encoder.dims.num_layers
        bad = [layer for layer in method.layers if not 0 <= layer < num_layers]
        if bad:
            raise ValueError(f"pruned layer(s) {bad} out of range: the model has layers 0..{num_layers - 1}")
        if method.score not in SCORES:
            raise ValueError(f"unknown token score {method.score!r}; expected one of {SCORES}")
        if method.max_length > self.encoder.max_positions:
            raise ValueError(f"max_length {method.max_length} exceeds the model's {self.encoder.max_positions} positions")
        model.config._attn_implementation = self.encoder.gated_attention
        self.model = model
        self.method = method
        self.mask_attention = mask_attention
        self.source: str | None = None
        """The model folder it was loaded from (``load_model``), for errors about its outputs."""

    @property
    def num_layers(self) -> int:
        return self.encoder.dims.num_layers

    @property
    def max_length(self) -> int:
        return self.method.max_length

    @property
    def pruned_layers(self) -> list[int]:
        return self.method.layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, hard: bool = False, prune: bool = True,
                return_scores: bool = False) -> GatedOutput:
        """``prune=False``: the same weights with nothing dropped (a distillation teacher).
        ``return_scores`` records the scores the layers ranked by (``GatedOutput.scores``, for
        `dynbert inspect`); it changes nothing that is computed."""
        method = self.method
        batch, length = input_ids.shape
        if length > self.max_length:
            raise ValueError(f"input length {length} exceeds the method's max_length {self.max_length}")
        hidden = self.encoder.embed(input_ids, token_type_ids if self.encoder.has_token_types else None)
        real = attention_mask.bool()
        num_tokens = real.sum(dim=1)
        # `alive`: the tokens hard mode would still hold. Soft mode carries it to rank tokens the
        # way hard mode does, and the running product of each token's weights, whose log masks the
        # token as a key, so weights below 0.5 still get gradient.
        alive = real
        kept_weight = real.to(hidden.dtype)
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        if hard:  # columns that are padding in every example cost time, not FLOPs: drop them now
            hidden, real, positions = _gather_kept(hidden, real, positions)
            alive, kept_weight = real, real.to(hidden.dtype)
        sizes = None  # set by a merging method's ``reduce``: how many input tokens each token stands for
        pruning = prune and bool(method.layers)
        state = method.prepare(hard) if pruning else None
        kept_counts, present_per_layer, kept_soft, keep_weights, scores_per_layer = [], [], [], [], []
        expected_counts = []
        decided = decisions = None
        if not hard and pruning:
            decided = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
            decisions = torch.zeros_like(decided)

        for index, layer in enumerate(self.encoder.layers):
            row = method.row.get(index) if pruning else None
            if row is not None and hard and method.keeps_all(state, row, hidden.size(1)):
                row = None
            bias = self._attention_bias(real, kept_weight, hidden.dtype, sizes)
            score_kwargs = {}
            if row is not None:
                score_kwargs = dict(token_score=method.score, score_queries=alive.to(hidden.dtype))
            attended, score = self.encoder.attention(layer, hidden, bias, positions, **score_kwargs)

            if return_scores:
                ranked = score if row is not None else torch.full_like(hidden[..., 0], math.nan)
                scores_per_layer.append(_scatter_scores(ranked, alive, positions, length))
            if row is not None:
                tokens = LayerTokens(score=score, alive=alive, positions=positions, input_ids=input_ids,
                                     num_tokens=num_tokens, hidden=attended)
                weight = method.keep_weights(state, row, tokens, hard)
                weight = torch.cat([torch.ones_like(weight[:, :1]), weight[:, 1:]], dim=1)  # CLS stays
                keep = alive & (weight >= 0.5)
                attended, reduced, positions, sizes = method.reduce(state, row, attended, keep, positions, sizes, hard)
                if hard:
                    alive = reduced
                    real = alive
                    kept_weight = alive.to(hidden.dtype)
                else:
                    with torch.no_grad():
                        counted = alive.clone()
                        counted[:, 0] = False
                        sure = (weight <= DECIDED_MARGIN) | (weight >= 1 - DECIDED_MARGIN)
                        decided += (counted & sure).sum(dim=1)
                        decisions += counted.sum(dim=1)
                    attended = attended * weight.unsqueeze(-1)
                    kept_weight = kept_weight * weight
                    alive = keep
                    kept_soft.append(kept_weight.sum(dim=1) / num_tokens)
                    keep_weights.append(torch.where(real, weight, 0.0))
            hidden = self.encoder.feed_forward(layer, attended)
            if not hard and pruning:
                expected_counts.append(kept_weight.float().sum(dim=1))
            kept_counts.append(alive.sum(dim=1))
            present_per_layer.append(_scatter_present(alive, positions, length))

        logits = self.encoder.head(hidden)
        flops_ratio_soft = flops_ratio_hard = None
        if expected_counts:
            dims = self.encoder.dims
            full = flops_per_example(num_tokens, baseline_kept(num_tokens, dims.num_layers), dims, torch.float).mean()
            expected = flops_per_example(num_tokens, torch.stack(expected_counts, dim=1), dims, torch.float)
            flops_ratio_soft = expected.mean() / full
            with torch.no_grad():
                rounded = flops_per_example(num_tokens, torch.stack(kept_counts, dim=1), dims, torch.float)
                flops_ratio_hard = rounded.mean() / full
        return GatedOutput(logits=logits, num_tokens=num_tokens, kept=torch.stack(kept_counts, dim=1),
                           present=torch.stack(present_per_layer, dim=1),
                           kept_soft=torch.stack(kept_soft, dim=1) if kept_soft else None,
                           decided=decided, decisions=decisions,
                           keep_weights=torch.stack(keep_weights, dim=1) if keep_weights else None,
                           flops_ratio_soft=flops_ratio_soft, flops_ratio_hard=flops_ratio_hard,
                           scores=torch.stack(scores_per_layer, dim=1) if return_scores else None)

    def _attention_bias(self, real, kept_weight, dtype, sizes=None) -> torch.Tensor:
        """Additive attention bias (batch, 1, 1, keys): -inf-like for pads, log of weights else, plus
        log(size) of a merged token when a merging method tracks ``sizes`` (ToMe's proportional
        attention: a token standing for s inputs is attended as s copies of itself would be). The
        adapter's ``attention`` adds its family's own terms (e.g. a relative position bias)."""
        blocked = torch.finfo(dtype).min
        if self.mask_attention:
            bias = torch.where(real & (kept_weight > 0), torch.log(kept_weight.clamp(min=_LOG_FLOOR)), blocked)
        else:
            bias = torch.where(real, 0.0, blocked).to(dtype)
        if sizes is not None:  # tokens gone and pads have size 0 and stay blocked
            bias = torch.where(sizes > 0, bias + torch.log(sizes.clamp(min=1)).to(bias.dtype), bias)
        return bias[:, None, None, :]

    def flops(self, out: GatedOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(FLOPs of each example as it ran, FLOPs of the same examples un-pruned)."""
        num_tokens, kept = out.num_tokens.cpu(), out.kept.cpu()
        dims = self.encoder.dims
        return (flops_per_example(num_tokens, kept, dims),
                flops_per_example(num_tokens, baseline_kept(num_tokens, dims.num_layers), dims))


def _gather_kept(hidden, keep, positions):
    """Physically drop tokens: gather the kept ones in their original order, pad to the longest."""
    new_length = int(keep.sum(dim=1).max())
    index = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :new_length]
    hidden = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
    return hidden, keep.gather(1, index), positions.gather(1, index)


def gather_tokens(hidden, keep, positions, sizes=None):
    """``TokenPruner.reduce``'s default in hard mode: ``_gather_kept``, and the sizes (if any) of the
    kept tokens gathered alike (0 in the padding): (hidden, alive, positions, sizes)."""
    hidden, alive, gathered_positions = _gather_kept(hidden, keep, positions)
    if sizes is not None:
        index = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :alive.size(1)]
        sizes = torch.where(alive, torch.where(keep, sizes, 0).gather(1, index), 0)
    return hidden, alive, gathered_positions, sizes


def _scatter_present(present, positions, length) -> torch.Tensor:
    """Map the current (possibly gathered) tokens back to a mask over the original positions."""
    original = torch.zeros(present.size(0), length, dtype=torch.bool, device=present.device)
    return original.scatter(1, positions, present)


def _scatter_scores(score, alive, positions, length) -> torch.Tensor:
    """The current tokens' scores over the original positions (NaN for tokens not present)."""
    original = torch.full((score.size(0), length), math.nan, dtype=torch.float, device=score.device)
    return original.scatter(1, positions, torch.where(alive, score.float(), math.nan))


# ---------------------------------------------------------------------------------------------
# FLOPs (METHOD.md §4): matrix products only, FLOPs = 2 x MACs, per example on real tokens.


def flops_per_example(num_tokens: torch.Tensor, kept: torch.Tensor, dims: EncoderDims,
                      dtype: torch.dtype = torch.double) -> torch.Tensor:
    """Analytic FLOPs of each example for a kept-token schedule.

    Layer l with L_in tokens entering and L_out after its decision (made after attention) costs
    ``dims.layer_macs(L_in, L_out)`` MACs, the family's own count (a BERT-shaped layer's by default:
    4·D²·L_in (Q, K, V, O) + 2·D·L_in² (QKᵀ, AV) + 2·D·I·L_out (FFN)). The head (on the first
    token: BERT's pooler and classifier, RoBERTa's, ELECTRA's and MPNet's dense and out_proj,
    DistilBERT's pre_classifier and classifier) and any projection inside the embeddings are
    counted; embedding lookups are not matrix products. ``num_tokens``: (batch,); ``kept``: (batch,
    layers), counts or (differentiable) expected counts. ``dtype``: double for reports; float where
    gradients flow (some devices have no float64).
    """
    tokens_out = kept.to(dtype)
    tokens_in = torch.cat([num_tokens.to(dtype)[:, None], tokens_out[:, :-1]], dim=1)
    macs = dims.layer_macs(tokens_in, tokens_out).sum(dim=1)
    macs = macs + dims.head_macs + dims.embed_macs_per_token * num_tokens.to(dtype)
    return 2 * macs


def baseline_kept(num_tokens: torch.Tensor, num_layers: int) -> torch.Tensor:
    """The un-pruned schedule: every layer keeps every real token."""
    return num_tokens[:, None].expand(-1, num_layers)


def flops_ratio(out_flops: torch.Tensor, baseline_flops: torch.Tensor) -> float:
    """Mean FLOPs over mean un-pruned FLOPs: the fraction of the work a batch of these inputs costs."""
    return float(out_flops.double().mean() / baseline_flops.double().mean())


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
