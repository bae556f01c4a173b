"""Evaluation: soft mode as trained, then hard mode (decisions rounded, tokens gathered).

The reported score is hard mode's: that is the model that runs at inference. Soft mode, its
agreement with hard mode and how many soft decisions ended at 0 or 1 say whether rounding
changed anything.
"""

from __future__ import annotations

import contextlib

import torch

from .core import DECIDED_MARGIN, GatedModel, TokenPruner
from .data import Encoded, collate
from .errors import DynbertError
from .tasks import TaskSpec, compute_metrics

DECIDED_WANTED = 0.95
"""Below this fraction of soft decisions at 0 or 1, the run warns that rounding changed the model."""
ONE_CLASS_SHARE = 0.95
"""From this share of dev predictions in one class, the run warns that its score is that class's.
(No GLUE dev set is that skewed: MRPC's 68% positive is the most.)"""


@torch.no_grad()
def predict(gated: GatedModel, data: Encoded, batch_size: int, hard: bool, spec: TaskSpec,
            autocast=contextlib.nullcontext) -> dict:
    """Per example, in ``data``'s order: logits, predictions, FLOPs (and the un-pruned baseline's),
    tokens kept after each layer (counts and fractions). Overall: cue kept, and (soft mode) how many
    token decisions were already 0 or 1.

    Inputs are bucketed by length (sorted), so each batch pads to little more than it needs.
    """
    gated.eval()
    device = next(gated.parameters()).device
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    logits_all, preds, flops, base, kept_tokens, cue_total, decided, decisions = [], [], [], [], [], 0, 0, 0
    cue_hits = torch.zeros(gated.num_layers, dtype=torch.long)
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        batch = collate(data, indices).to(device)
        with autocast():
            out = gated(batch.input_ids, batch.attention_mask, batch.token_type_ids, hard=hard)
        logits = out.logits.float().cpu()
        refuse_non_finite(gated, logits)
        logits_all.append(logits)
        preds.append(logits.squeeze(-1) if spec.is_regression else logits.argmax(-1))
        example_flops, baseline_flops = gated.flops(out)
        flops.append(example_flops)
        base.append(baseline_flops)
        kept_tokens.append(out.kept.cpu())
        if out.decided is not None:
            decided += int(out.decided.sum())
            decisions += int(out.decisions.sum())
        if data.cue_mask is not None:
            present = out.present.cpu()
            for row, i in enumerate(indices):
                cues = torch.tensor(data.cue_mask[i])
                cue_hits += present[row, :, : len(cues)][:, cues].sum(dim=1)
                cue_total += int(cues.sum())
    restore = torch.empty(len(order), dtype=torch.long)
    restore[torch.tensor(order)] = torch.arange(len(order))
    kept_tokens = torch.cat(kept_tokens)[restore]
    num_tokens = torch.tensor(data.lengths, dtype=torch.double)
    return dict(logits=torch.cat(logits_all)[restore], predictions=torch.cat(preds)[restore],
                flops=torch.cat(flops)[restore], baseline_flops=torch.cat(base)[restore], kept_tokens=kept_tokens,
                kept=kept_tokens.double() / num_tokens[:, None],
                cue_kept=(cue_hits / cue_total).tolist() if cue_total else None,
                decided=decided / decisions if decisions else None)


def refuse_non_finite(gated: GatedModel, logits: torch.Tensor) -> None:
    """NaN logits argmax to class 0 and give NaN probabilities: never a prediction, a file or a metric."""
    if not torch.isfinite(logits).all():
        model = f"the model in {gated.source}" if gated.source else "the model"
        raise DynbertError(f"the outputs of {model} are not finite (NaN or infinity): its weights are damaged or "
                           "its training diverged; train the run again (with a lower train.lr if it diverged)")


def evaluate(gated: GatedModel, encoded: dict[str, Encoded], spec: TaskSpec, batch_size: int,
             autocast=contextlib.nullcontext) -> dict:
    """Soft mode as trained, then hard (gathered) mode with the decisions rounded to 0/1.

    Leaves the method hardened. Returns the metrics.json fields that evaluation decides.
    """
    metrics, soft_preds = {}, {}
    for hard in (False, True):
        if hard:
            gated.method.harden_()
        for index, split in enumerate(spec.eval_splits):
            data = encoded[split]
            result = predict(gated, data, batch_size, hard, spec, autocast)
            values = compute_metrics(spec, result["predictions"].tolist(), data.labels.tolist())
            suffix = "" if index == 0 else "_mm"
            if not hard:
                soft_preds[split] = result["predictions"]
                if index == 0:
                    metrics["score_soft"] = values[spec.main_metric]
                    metrics["decided"] = result["decided"]
                continue
            metrics.setdefault("metrics", {}).update({f"{k}{suffix}": v for k, v in values.items()})
            if index == 0:
                metrics["metric"] = spec.main_metric
                metrics["score"] = values[spec.main_metric]
                metrics["flops_per_example"] = result["flops"].mean().item()
                metrics["baseline_flops_per_example"] = result["baseline_flops"].mean().item()
                metrics["flops_ratio"] = metrics["flops_per_example"] / metrics["baseline_flops_per_example"]
                metrics["kept_per_layer"] = result["kept"].mean(dim=0).tolist()
                metrics["trivial_score"] = trivial_score(spec, data.labels)
                # Cue tokens entering the last layer (after it, only CLS is read: its gates close).
                cue_per_layer = result["cue_kept"]
                metrics["cue_kept_per_layer"] = cue_per_layer
                metrics["cue_kept"] = cue_per_layer[-2] if cue_per_layer and len(cue_per_layer) > 1 else None
                if spec.is_regression:
                    metrics["hard_soft_agreement"] = None
                    metrics["most_predicted"] = None
                else:
                    metrics["most_predicted"] = most_predicted(spec, result["predictions"], data.labels)
                    same = soft_preds[split] == result["predictions"]
                    metrics["hard_soft_agreement"] = same.float().mean().item()
    if "train" in encoded:
        # The same model on training inputs: whether the FLOPs it was trained to (a method.target)
        # hold on dev, whose lengths may differ (SST-2's training phrases are half as long).
        sample = encoded["train"].head(TRAIN_FLOPS_SAMPLE)
        result = predict(gated, sample, batch_size, True, spec, autocast)
        metrics["train_flops_ratio"] = (result["flops"].mean() / result["baseline_flops"].mean()).item()
    return metrics


TRAIN_FLOPS_SAMPLE = 1000
"""Training examples (the first ones) whose FLOPs ratio metrics.json reports beside dev's."""


def trivial_score(spec: TaskSpec, labels: torch.Tensor) -> float:
    """The score of always answering the most frequent class (0 for STS-B: a constant has no
    correlation): how far above knowing nothing a score is."""
    if spec.is_regression:
        return 0.0
    majority = int(torch.bincount(labels, minlength=spec.num_labels).argmax())
    return compute_metrics(spec, [majority] * len(labels), labels.tolist())[spec.main_metric]


def most_predicted(spec: TaskSpec, predictions: torch.Tensor, labels: torch.Tensor) -> dict:
    """The class predicted most, its share of the predictions and the score of always answering it:
    a model that collapsed to one class scores about that, having learned nothing."""
    counts = torch.bincount(predictions, minlength=spec.num_labels)
    label = int(counts.argmax())
    constant = compute_metrics(spec, [label] * len(labels), labels.tolist())[spec.main_metric]
    return dict(label=spec.label_names[label], share=counts[label].item() / len(predictions), constant_score=constant)


def one_class_warning(metrics: dict) -> str | None:
    """Dev predictions (nearly) all one class: a score that looks like a result and is a collapse."""
    most = metrics.get("most_predicted")
    if not most or most["share"] < ONE_CLASS_SHARE:
        return None
    kept = metrics["kept_per_layer"][-1]
    advice = (f"prune less than {metrics['knob']}={metrics['knob_value']:g} does (after the last layer "
              f"{100 * kept:.0f}% of the tokens were left)" if metrics.get("knob") and kept < 1
              else "train longer or change train.lr")
    return (f"{100 * most['share']:.0f}% of the dev predictions are '{most['label']}', and always answering it "
            f"scores {most['constant_score']:.4f} (this run: {metrics['score']:.4f}): the model learned next to "
            f"nothing; {advice}, or try another seed")


def run_warnings(metrics: dict, knob_active: bool, method: TokenPruner) -> list[str]:
    """What a user must hear when the model collapsed to one class, pruning silently did nothing, or
    rounding changed the model. ``knob_active``: whether the run asked for pruning
    (``declarations.knob_active``)."""
    collapsed = one_class_warning(metrics)
    warnings = [collapsed] if collapsed else []
    if not method.layers:
        return warnings
    schedule = method.schedule_warning(metrics["steps"]) if knob_active and "steps" in metrics else None
    if schedule:
        warnings.append(schedule)
    if knob_active and metrics["flops_ratio"] > 0.995:
        warnings.append(f"no token was pruned (FLOPs ratio {metrics['flops_ratio']:.3f}): {method.never_pruned_advice}")
    decided = metrics.get("decided")
    if decided is not None and decided < DECIDED_WANTED:
        warnings.append(f"the soft decisions did not end at 0 or 1 ({100 * decided:.0f}% within {DECIDED_MARGIN}, "
                        f"{100 * DECIDED_WANTED:.0f}% wanted), so rounding them changed the model: "
                        f"{method.undecided_advice}")
    return warnings
