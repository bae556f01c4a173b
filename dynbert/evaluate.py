"""Evaluation: soft mode with the trained gates, then hard mode (gates rounded, tokens gathered).

The reported score is hard mode's: that is the model that runs at inference. Soft mode, its
agreement with hard mode and how bimodal the gates ended say whether rounding changed anything.
"""

from __future__ import annotations

import contextlib

import torch

from .core import GatedBert, baseline_kept, flops_per_example
from .data import Encoded, collate
from .tasks import TaskSpec, compute_metrics

BIMODAL_MARGIN = 0.05
"""A gate within this distance of 0 or 1 counts as decided (``gates_bimodal``)."""
BIMODAL_WANTED = 0.95
"""Below this fraction of decided gate uses, the run warns that rounding changed the model."""


@torch.no_grad()
def predict(gated: GatedBert, data: Encoded, batch_size: int, hard: bool, spec: TaskSpec,
            autocast=contextlib.nullcontext) -> dict:
    """Predictions, per-example FLOPs (and the un-pruned baseline's), kept fractions, cue kept.

    Inputs are bucketed by length (sorted), so each batch pads to little more than it needs.
    ``gate_values``: in soft mode, the gate value each present token met at each gated layer.
    """
    gated.eval()
    device = next(gated.parameters()).device
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    config = gated.model.config
    dims = (config.hidden_size, config.intermediate_size, config.num_labels)
    preds, flops, base, kept, cue_total = [], [], [], [], 0
    cue_hits = torch.zeros(gated.num_layers, dtype=torch.long)
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        batch = collate(data, indices).to(device)
        with autocast():
            out = gated(batch.input_ids, batch.attention_mask, batch.token_type_ids, hard=hard)
        logits = out.logits.float().cpu()
        preds.append(logits.squeeze(-1) if spec.is_regression else logits.argmax(-1))
        num_tokens, kept_counts = out.num_tokens.cpu(), out.kept.cpu()
        flops.append(flops_per_example(num_tokens, kept_counts, *dims))
        base.append(flops_per_example(num_tokens, baseline_kept(num_tokens, gated.num_layers), *dims))
        kept.append(kept_counts.double() / num_tokens.double()[:, None])
        if data.cue_mask is not None:
            present = out.present.cpu()
            for row, i in enumerate(indices):
                cues = torch.tensor(data.cue_mask[i])
                cue_hits += present[row, :, : len(cues)][:, cues].sum(dim=1)
                cue_total += int(cues.sum())
    restore = torch.empty(len(order), dtype=torch.long)
    restore[torch.tensor(order)] = torch.arange(len(order))
    return dict(predictions=torch.cat(preds)[restore], flops=torch.cat(flops), baseline_flops=torch.cat(base),
                kept=torch.cat(kept), cue_kept=(cue_hits / cue_total).tolist() if cue_total else None)


@torch.no_grad()
def gates_bimodal(gated: GatedBert, data: Encoded, batch_size: int) -> float | None:
    """The fraction of gate uses on ``data`` (a present token meeting its rank's gate in a gated
    layer, soft mode) whose gate is within ``BIMODAL_MARGIN`` of 0 or 1. None without gates.

    Counted over uses, not over the gate table: ranks that no input reaches never matter.
    """
    if not gated.gate_layers:
        return None
    device = next(gated.parameters()).device
    gates = gated.gates().float()
    decided = ((gates <= BIMODAL_MARGIN) | (gates >= 1 - BIMODAL_MARGIN)).cpu()
    total = hits = 0
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    gated.eval()
    for start in range(0, len(order), batch_size):
        batch = collate(data, order[start:start + batch_size]).to(device)
        out = gated(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        # Tokens present entering each gated layer meet ranks 1..(present - 1) (CLS's gate is fixed).
        entering = torch.cat([out.num_tokens[:, None], out.kept[:, :-1]], dim=1).cpu()
        for row, layer in enumerate(gated.gate_layers):
            counts = entering[:, layer]
            for n in counts.unique().tolist():
                users = int((counts == n).sum())
                hits += users * int(decided[row, 1:n].sum())
                total += users * max(n - 1, 0)
    return hits / total if total else 1.0


def evaluate(gated: GatedBert, encoded: dict[str, Encoded], spec: TaskSpec, batch_size: int,
             autocast=contextlib.nullcontext) -> dict:
    """Soft mode with the trained gates, then hard (gathered) mode with gates rounded to 0/1.

    Leaves the gates hardened. Returns the metrics.json fields that evaluation decides.
    """
    metrics, soft_preds = {}, {}
    main = spec.eval_splits[0]
    metrics["gates_bimodal"] = gates_bimodal(gated, encoded[main], batch_size)
    for hard in (False, True):
        if hard:
            gated.gates.harden_()
        for index, split in enumerate(spec.eval_splits):
            data = encoded[split]
            result = predict(gated, data, batch_size, hard, spec, autocast)
            values = compute_metrics(spec, result["predictions"].tolist(), data.labels.tolist())
            suffix = "" if index == 0 else "_mm"
            if not hard:
                soft_preds[split] = result["predictions"]
                if index == 0:
                    metrics["score_soft"] = values[spec.main_metric]
                continue
            metrics.setdefault("metrics", {}).update({f"{k}{suffix}": v for k, v in values.items()})
            if index == 0:
                metrics["metric"] = spec.main_metric
                metrics["score"] = values[spec.main_metric]
                metrics["flops_per_example"] = result["flops"].mean().item()
                metrics["baseline_flops_per_example"] = result["baseline_flops"].mean().item()
                metrics["flops_ratio"] = metrics["flops_per_example"] / metrics["baseline_flops_per_example"]
                metrics["kept_per_layer"] = result["kept"].mean(dim=0).tolist()
                # Cue tokens entering the last layer (after it, only CLS is read: its gates close).
                cue_per_layer = result["cue_kept"]
                metrics["cue_kept_per_layer"] = cue_per_layer
                metrics["cue_kept"] = cue_per_layer[-2] if cue_per_layer and len(cue_per_layer) > 1 else None
                if spec.is_regression:
                    metrics["hard_soft_agreement"] = None
                else:
                    same = soft_preds[split] == result["predictions"]
                    metrics["hard_soft_agreement"] = same.float().mean().item()
    return metrics


def pruning_warnings(metrics: dict, lam: float, gated_run: bool) -> list[str]:
    """What a user must hear when pruning silently did nothing, or rounding changed the model."""
    if not gated_run:
        return []
    warnings = []
    if lam > 0 and metrics["flops_ratio"] > 0.995:
        warnings.append(f"no token was pruned (FLOPs ratio {metrics['flops_ratio']:.3f} at lambda={lam:g}): "
                        "the gates never closed; train longer (train.epochs), raise lambda or gate.lr, "
                        "or start the gates earlier (gate.start)")
    bimodal = metrics.get("gates_bimodal")
    if bimodal is not None and bimodal < BIMODAL_WANTED:
        warnings.append(f"the gates did not end bimodal ({100 * bimodal:.0f}% of gate uses within "
                        f"{BIMODAL_MARGIN} of 0 or 1, {100 * BIMODAL_WANTED:.0f}% wanted), so rounding them "
                        "changed the model (hard/soft agreement "
                        f"{metrics['hard_soft_agreement'] if metrics.get('hard_soft_agreement') is not None else 'n/a'}): "
                        "train longer, or raise gate.bimodal_weight")
    return warnings
