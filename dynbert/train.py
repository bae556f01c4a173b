"""One gated fine-tuning run: data, model, loop, evaluation, and the run folder.

``train(cfg) -> metrics`` is what `dynbert train`, `dynbert sweep` and the tests call. The run
folder is a contract (README, "The run folder"): config.yaml, train.log, checkpoint.pt while
training, model/ (HF layout plus gates.safetensors) and metrics.json when done.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.nn import functional as F

from . import __version__
from .core import (GatedBert, baseline_kept, bimodal_weight, flops_per_example, gate_regularizer,
                   layer_weights)
from .errors import DynbertError, atomic_write_bytes, atomic_write_json, atomic_write_text
from .modeling import build_model, load_model, make_gated, save_model
from .tasks import Example, TaskSpec, compute_metrics, get_task, load_glue, make_synthetic

CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, LOG_FILE = "config.yaml", "metrics.json", "checkpoint.pt", "train.log"
MODEL_DIR, TOKENIZER_DIR = "model", "tokenizer"
# Keys that change how a run is executed, not what it computes: they may differ on resume.
EXECUTION_KEYS = ("train.overwrite", "train.num_threads", "output_dir", "sweep")
METRICS_KEYS = ("task", "lambda", "seed", "metric", "score", "score_soft", "metrics",
                "flops_per_example", "baseline_flops_per_example", "flops_ratio", "kept_per_layer",
                "train_seconds", "version")


class TrainingInterrupted(DynbertError):
    """Ctrl-C during training: a checkpoint was saved; the same command resumes."""


def read_complete_metrics(run_dir: Path) -> dict | None:
    """The run's metrics.json if it is complete, else None (missing, corrupt or partial)."""
    import json

    try:
        metrics = json.loads((run_dir / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or any(key not in metrics for key in METRICS_KEYS):
        return None
    return metrics


def train(cfg: DictConfig, console: Console | None = None) -> dict:
    """Fine-tune with gates, evaluate in soft and hard mode, write the run folder; return metrics."""
    console = console or Console(stderr=True)
    run_dir = Path(cfg.output_dir).expanduser()
    _claim_run_dir(run_dir, cfg)
    done = read_complete_metrics(run_dir)
    if done is not None:
        console.print(f"[green]already complete[/]: {run_dir / METRICS_FILE}")
        return done
    logger = _file_logger(run_dir / LOG_FILE)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.seed)

    spec = get_task(cfg.task.name)
    splits = _load_splits(cfg, spec)
    model, tokenizer = _model_and_tokenizer(cfg, spec, splits["train"], run_dir)
    gated = make_gated(model, cfg.gate, cfg.task.max_length)
    encoded = {name: encode(examples, tokenizer, cfg.task.max_length, spec)
               for name, examples in splits.items()}

    state = _fit(gated, encoded["train"], cfg, run_dir, spec, logger, console)
    train_seconds = state.seconds  # the loop's own time, summed over resumes

    metrics = _evaluate_all(gated, encoded, spec, cfg)  # leaves the gates hardened to 0/1
    save_model(gated, tokenizer, run_dir / MODEL_DIR)
    metrics.update(task=spec.name, baseline=not cfg.gate.enabled, seed=cfg.seed,
                   train_seconds=round(train_seconds, 2), version=__version__,
                   steps=state.step, run_dir=str(run_dir), gate_score=cfg.gate.score)
    metrics["lambda"] = float(cfg["lambda"])
    atomic_write_json(run_dir / METRICS_FILE, metrics)
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    logger.info("done: %s", {k: metrics[k] for k in ("score", "score_soft", "flops_ratio")})
    return metrics


def load_run(run_dir: Path) -> GatedBert:
    """The trained, pruned model of a finished run folder (its gates are exactly 0/1)."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / CONFIG_FILE).is_file():
        raise DynbertError(f"{run_dir} is not a run folder (no {CONFIG_FILE}): pass a folder "
                           "that `dynbert train` wrote")
    try:
        cfg = OmegaConf.load(run_dir / CONFIG_FILE)
        gate_cfg, max_length = cfg.gate, cfg.task.max_length
    except Exception as error:  # not YAML, or not a dynbert config: either way not a run to load
        raise DynbertError(f"{run_dir / CONFIG_FILE} is not a dynbert run config "
                           f"({error.__class__.__name__}): pass a folder that `dynbert train` wrote") from error
    gated, _ = load_model(run_dir / MODEL_DIR, gate_cfg, max_length)
    return gated


# ---------------------------------------------------------------------------------------------
# Run folder


def _claim_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Write config.yaml, or check that the folder holds this same run (so resuming is safe).

    Only a checkpoint or metrics are worth keeping. A run folder with neither (a run that failed
    before its first checkpoint: a bad data folder, a gate layer out of range) is taken over by the
    corrected command; refusing it would block the fix, since the folder is named by task and λ.
    """
    config_path = run_dir / CONFIG_FILE
    has_progress = any((run_dir / name).is_file() for name in (METRICS_FILE, CHECKPOINT_FILE))
    if config_path.is_file() and has_progress and not cfg.train.overwrite:
        try:
            previous = OmegaConf.load(config_path)
        except Exception as error:
            raise DynbertError(f"{config_path} is unreadable ({error.__class__.__name__}); pass "
                               "train.overwrite=true to start over in that folder") from error
        differ = _differing_keys(previous, cfg)
        if differ:
            raise DynbertError(f"{run_dir} holds another run (differs in {', '.join(differ)}); "
                               "pass train.overwrite=true to start over, or another output_dir")
    elif cfg.train.overwrite or config_path.is_file():
        for name in (METRICS_FILE, CHECKPOINT_FILE, LOG_FILE):
            (run_dir / name).unlink(missing_ok=True)
        if config_path.is_file():  # a run folder: its tokenizer (trained on the old data) would be reloaded
            for name in (TOKENIZER_DIR, MODEL_DIR):
                shutil.rmtree(run_dir / name, ignore_errors=True)
    atomic_write_text(config_path, OmegaConf.to_yaml(cfg))


def _differing_keys(old: DictConfig, new: DictConfig) -> list[str]:
    flat_old, flat_new = _flatten(OmegaConf.to_container(old)), _flatten(OmegaConf.to_container(new))
    keys = sorted(set(flat_old) | set(flat_new))
    return [k for k in keys if flat_old.get(k) != flat_new.get(k)
            and not any(k == e or k.startswith(e + ".") for e in EXECUTION_KEYS)]


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def _file_logger(path: Path) -> logging.Logger:
    logger = logging.getLogger(f"dynbert.run.{path.parent}")
    logger.handlers.clear()
    logger.propagate = False
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


# ---------------------------------------------------------------------------------------------
# Data


def _load_splits(cfg: DictConfig, spec: TaskSpec) -> dict[str, list[Example]]:
    if spec.name == "synthetic":
        task = cfg.task
        splits = make_synthetic(task.num_train, task.num_eval, cfg.seed, task.min_words, task.max_words)
    else:
        splits = load_glue(spec, cfg.task.data_dir)
    limits = {"train": cfg.train.max_train_samples}
    limits.update({name: cfg.train.max_eval_samples for name in spec.eval_splits})
    return {name: splits[name][: limits[name]] if limits[name] else splits[name] for name in limits}


@dataclass
class Encoded:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: torch.Tensor
    cue_mask: list[list[bool]] | None
    pad_id: int


def encode(examples: list[Example], tokenizer, max_length: int, spec: TaskSpec) -> Encoded:
    """Tokenize without padding (batches pad to their own longest input)."""
    texts_b = [e.text_b for e in examples]
    batch = tokenizer([e.text_a for e in examples], texts_b if any(texts_b) else None,
                      truncation=True, max_length=max_length)
    label_dtype = torch.float if spec.num_labels == 1 else torch.long
    cue_mask = None
    if any(e.cue_words for e in examples):
        cue_mask = [[word in e.cue_words for word in batch.word_ids(i)] for i, e in enumerate(examples)]
    return Encoded(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                   labels=torch.tensor([e.label for e in examples], dtype=label_dtype), cue_mask=cue_mask,
                   pad_id=tokenizer.pad_token_id)


def collate(data: Encoded, indices: list[int]):
    longest = max(len(data.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), longest), data.pad_id, dtype=torch.long)
    types = torch.zeros((len(indices), longest), dtype=torch.long)
    mask = torch.zeros((len(indices), longest), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        types[row, :n] = torch.tensor(data.token_type_ids[i])
        mask[row, :n] = 1
    return ids, types, mask, data.labels[indices]


# ---------------------------------------------------------------------------------------------
# Model


def _model_and_tokenizer(cfg: DictConfig, spec: TaskSpec, train_examples: list[Example], run_dir: Path):
    """Build the model; a tiny model's tokenizer is trained once and kept in the run folder."""
    from transformers import AutoTokenizer

    texts = [t for e in train_examples for t in (e.text_a, e.text_b) if t]
    model, tokenizer = build_model(cfg.model, spec.num_labels, cfg.task.max_length, texts)
    if cfg.model.name_or_path is None:
        saved = run_dir / TOKENIZER_DIR
        if (saved / "tokenizer.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(saved)
        else:
            tokenizer.save_pretrained(saved)
    return model, tokenizer


def _task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.size(-1) == 1:
        return F.mse_loss(logits.squeeze(-1), labels)
    return F.cross_entropy(logits, labels)


# ---------------------------------------------------------------------------------------------
# Training loop


@dataclass
class LoopState:
    step: int = 0
    seconds: float = 0.0


def _optimizer(gated: GatedBert, cfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW: BERT at train.lr with weight decay (not on biases and LayerNorms); gates at gate.lr."""
    decay, no_decay = [], []
    for name, param in gated.model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
    groups = [dict(params=decay, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay),
              dict(params=no_decay, lr=cfg.train.lr, weight_decay=0.0)]
    if gated.gate_layers:
        groups.append(dict(params=[gated.gates.raw], lr=cfg.gate.lr, weight_decay=0.0))
    return torch.optim.AdamW(groups)


def _scheduler(optimizer, total_steps: int, warmup_ratio: float, gate_start: float):
    """BERT: linear warm-up then linear decay. Gates: frozen until `gate.start`, then constant.

    A model trained from scratch must first learn which tokens matter; gates that move before
    that only see the sparsity pull and close everything.
    """
    warmup = int(warmup_ratio * total_steps)

    def bert(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    def gates(step: int) -> float:
        return 1.0 if step >= gate_start * total_steps else 0.0

    lambdas = [bert] * 2 + [gates] * (len(optimizer.param_groups) - 2)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def _gate_progress(step: int, total_steps: int, gate_start: float) -> float:
    """How far the gates' own phase of training is, in [0, 1] (the bi-modal schedule runs on it)."""
    begin = gate_start * total_steps
    return min(max((step - begin) / max(1.0, total_steps - begin), 0.0), 1.0)


def _fit(gated: GatedBert, data: Encoded, cfg: DictConfig, run_dir: Path, spec: TaskSpec,
         logger: logging.Logger, console: Console) -> LoopState:
    tcfg = cfg.train
    batch_size = tcfg.batch_size
    steps_per_epoch = math.ceil(len(data.labels) / batch_size)
    if steps_per_epoch == 0:
        raise DynbertError(f"task {spec.name} has no training examples")
    total_steps = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps:
        total_steps = min(total_steps, tcfg.max_steps)
    optimizer = _optimizer(gated, cfg)
    scheduler = _scheduler(optimizer, total_steps, tcfg.warmup_ratio, cfg.gate.start)
    weights = layer_weights(gated.gate_layers, gated.num_layers, cfg.gate.layer_weighting)
    lam = float(cfg["lambda"])
    state = LoopState()
    checkpoint = run_dir / CHECKPOINT_FILE
    if checkpoint.is_file():
        state = _load_checkpoint(checkpoint, gated, optimizer, scheduler)
        logger.info("resumed from step %d", state.step)
        console.print(f"resuming {run_dir} from step {state.step}")

    gated.train()
    first_step = state.step
    started = time.perf_counter()
    seconds_before = state.seconds
    # Off a terminal (logs, sweeps) the progress bar would only print blank lines: train.log has it.
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=console,
                        transient=True, disable=not console.is_terminal)
    live = progress if console.is_terminal else contextlib.nullcontext()

    saved_step = state.step if checkpoint.is_file() else None

    def save(step: int) -> None:
        nonlocal saved_step
        state.seconds = seconds_before + time.perf_counter() - started
        _save_checkpoint(checkpoint, gated, optimizer, scheduler, step, state.seconds)
        saved_step = step

    def not_finite(what: str, detail: str) -> DynbertError:
        kept = (f"the checkpoint of step {saved_step} is kept in {run_dir}" if saved_step is not None
                else "no checkpoint was saved yet")
        return DynbertError(f"{what} is not finite at step {state.step + 1} ({detail}); training stopped and "
                            f"{kept}: lower train.lr or gate.lr and start over with train.overwrite=true")

    try:
        with live:
            bar = progress.add_task(f"{spec.name} λ={lam:g}", total=total_steps, completed=state.step, stats="")
            while state.step < total_steps:
                epoch, offset = divmod(state.step, steps_per_epoch)
                order = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
                batch_indices = order[offset * batch_size:(offset + 1) * batch_size]
                ids, types, mask, labels = collate(data, batch_indices)
                out = gated(ids, mask, types)
                task_loss = _task_loss(out.logits, labels)
                loss = task_loss
                parts = None
                if gated.gate_layers:
                    mu = bimodal_weight(_gate_progress(state.step, total_steps, cfg.gate.start), lam,
                                        cfg.gate.bimodal_weight, cfg.gate.bimodal_schedule)
                    parts = gate_regularizer(gated.gates(), weights, lam, mu)
                    loss = task_loss + parts.total
                if not torch.isfinite(loss):
                    detail = f"task {task_loss.item():.4g}"
                    if parts is not None:
                        detail += f", sparsity {parts.sparsity.item():.4g}, bimodal {parts.bimodal.item():.4g}"
                    raise not_finite("loss", detail)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(gated.model.parameters(), tcfg.max_grad_norm)
                # A finite loss can still have an infinite gradient: stop before it reaches the weights
                # (and the next checkpoint).
                if not torch.isfinite(grad_norm):
                    raise not_finite("the gradient", f"norm {grad_norm.item():.4g}, loss {loss.item():.4g}")
                optimizer.step()
                scheduler.step()
                gated.gates.project_()
                state.step += 1

                speed = (state.step - first_step) * batch_size / (time.perf_counter() - started)
                stats = _step_stats(task_loss, parts, gated, out) + f" {speed:.0f} ex/s"
                progress.update(bar, completed=state.step, stats=stats)
                if state.step % 50 == 0 or state.step == total_steps:
                    logger.info("step %d/%d %s", state.step, total_steps, stats)
                if state.step % tcfg.checkpoint_every == 0 or state.step % steps_per_epoch == 0:
                    save(state.step)
    except KeyboardInterrupt:
        save(state.step)
        raise TrainingInterrupted(f"interrupted at step {state.step}/{total_steps}; a checkpoint is saved "
                                  f"in {run_dir}: run the same command again to resume") from None
    state.seconds = seconds_before + time.perf_counter() - started
    return state


def _step_stats(task_loss, parts, gated, out) -> str:
    text = f"task {task_loss.item():.3f}"
    if parts is not None:
        open_gates = gated.gates().detach()[:, 1:].ge(0.5).float().mean().item()
        kept = (out.kept[:, -1].float() / out.num_tokens.float()).mean().item()
        text += (f" sparsity {parts.sparsity.item():.3f} bimodal {parts.bimodal.item():.4f}"
                 f" open {open_gates:.2f} kept-last {kept:.2f}")
    return text


def _save_checkpoint(path: Path, gated, optimizer, scheduler, step: int, seconds: float) -> None:
    import io

    buffer = io.BytesIO()
    torch.save({"model": gated.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                "step": step, "seconds": seconds}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _load_checkpoint(path: Path, gated, optimizer, scheduler) -> LoopState:
    try:
        saved = torch.load(path, weights_only=True)
        gated.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
    except Exception as error:
        raise DynbertError(f"{path} is not a usable checkpoint ({error.__class__.__name__}); delete it "
                           "to restart this run, or pass train.overwrite=true") from error
    return LoopState(step=int(saved["step"]), seconds=float(saved["seconds"]))


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def predict(gated: GatedBert, data: Encoded, batch_size: int, hard: bool):
    """Predictions, per-example FLOPs (and the un-pruned baseline's), kept fractions, cue kept.

    Inputs are bucketed by length (sorted), so each batch pads to little more than it needs.
    """
    gated.eval()
    order = sorted(range(len(data.labels)), key=lambda i: len(data.input_ids[i]))
    config = gated.model.config
    preds, flops, base, kept, cue_total = [], [], [], [], 0
    cue_hits = torch.zeros(gated.num_layers, dtype=torch.long)
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        ids, types, mask, _ = collate(data, indices)
        out = gated(ids, mask, types, hard=hard)
        preds.append(out.logits.squeeze(-1) if out.logits.size(-1) == 1 else out.logits.argmax(-1))
        dims = (config.hidden_size, config.intermediate_size, config.num_labels)
        flops.append(flops_per_example(out.num_tokens, out.kept, *dims))
        base.append(flops_per_example(out.num_tokens, baseline_kept(out.num_tokens, gated.num_layers), *dims))
        kept.append(out.kept.double() / out.num_tokens.double()[:, None])
        if data.cue_mask is not None:
            for row, i in enumerate(indices):
                cues = torch.tensor(data.cue_mask[i])
                cue_hits += out.present[row, :, : len(cues)][:, cues].sum(dim=1)
                cue_total += int(cues.sum())
    restore = torch.empty(len(order), dtype=torch.long)
    restore[torch.tensor(order)] = torch.arange(len(order))
    predictions = torch.cat(preds)[restore]
    return dict(predictions=predictions, flops=torch.cat(flops), baseline_flops=torch.cat(base),
                kept=torch.cat(kept), cue_kept=(cue_hits / cue_total).tolist() if cue_total else None)


def _evaluate_all(gated: GatedBert, encoded: dict[str, Encoded], spec: TaskSpec, cfg: DictConfig) -> dict:
    """Soft mode with the trained gates, then hard (gathered) mode with gates rounded to 0/1."""
    metrics, soft_preds = {}, {}
    for hard in (False, True):
        if hard:
            gated.gates.harden_()
        for index, split in enumerate(spec.eval_splits):
            data = encoded[split]
            result = predict(gated, data, cfg.train.eval_batch_size, hard)
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
                same = soft_preds[split] == result["predictions"] if spec.num_labels > 1 else None
                metrics["hard_soft_agreement"] = same.float().mean().item() if same is not None else None
    return metrics
