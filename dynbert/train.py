"""One gated fine-tuning run: ``train(cfg) -> metrics``, what `dynbert train`, the sweep and tests call.

The loop follows HF ``run_glue_no_trainer.py``: Accelerate places the model and batches (CUDA,
MPS or CPU; several GPUs with ``accelerate launch``), runs mixed precision (bf16 or fp16 with loss
scaling) and leaves the loop in plain sight. The run folder (``rundir.py``), the batches
(``data.py``) and evaluation (``evaluate.py``) live beside it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.nn import functional as F

from . import __version__, stop
from .config import knob_key
from .core import GatedModel, GatedOutput, RegularizerParts
from .data import Batch, Encoded, collate, encode, epoch_batches, load_splits
from .errors import DynbertError, atomic_write_json
from .evaluate import evaluate, run_warnings
from .modeling import build_model, load_model, make_gated_model, save_model
from .rundir import (CHECKPOINT_FILE, CHECKPOINT_SUM_FILE, LOG_FILE, METRICS_FILE, MODEL_DIR, RunLock, claim,
                     load_checkpoint, load_run_config, read_complete_metrics, save_checkpoint)
from .tasks import TaskSpec, all_texts, get_task

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
"""train.precision -> Accelerate's mixed_precision."""


class TrainingInterrupted(DynbertError):
    """Ctrl-C or SIGTERM during training: a checkpoint was saved; the same command resumes."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def train(cfg: DictConfig, console: Console | None = None) -> dict:
    """Fine-tune with token pruning, evaluate in soft and hard mode, write the run folder; return metrics."""
    console = console or Console(stderr=True)
    run_dir = Path(str(cfg.output_dir)).expanduser()
    accelerator = make_accelerator(cfg.train)
    stop.install()
    main = accelerator.is_main_process
    if main and cfg.train.precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_native_bf16():
        console.print("[yellow]warning:[/] this CPU has neither AVX512-BF16 nor AMX, so bf16 is emulated and "
                      "trains several times slower than fp32: pass train.precision=fp32 unless you are testing bf16",
                      highlight=False, soft_wrap=True)
    with RunLock(run_dir) if main else contextlib.nullcontext():
        if main:
            claim(run_dir, cfg)
        accelerator.wait_for_everyone()
        done = read_complete_metrics(run_dir)
        if done is not None:
            console.print(f"[green]already complete[/]: {run_dir / METRICS_FILE}")
            return done
        return _run(cfg, run_dir, accelerator, console)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere torch emulates it."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def make_accelerator(tcfg: DictConfig):
    """Accelerate for ``train.device`` and ``train.precision``, or one sentence on why not."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    device, precision = tcfg.device, tcfg.precision
    if device == "cuda" and not torch.cuda.is_available():
        raise DynbertError("train.device=cuda but no CUDA GPU is visible: pass train.device=auto or cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise DynbertError("train.device=mps but MPS is not available here: pass train.device=auto or cpu")
    on_gpu = device in ("cuda", "auto") and torch.cuda.is_available()
    if precision == "fp16" and not on_gpu:
        raise DynbertError("train.precision=fp16 needs a CUDA GPU (loss scaling): pass train.precision=bf16 "
                           "or fp32 on this machine")
    # Accelerate keeps one precision per process; a process that trains several runs (tests, a
    # sequential sweep) starts each from a clean slate. The distributed state is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=device == "cpu", mixed_precision=PRECISIONS[precision])


def _run(cfg: DictConfig, run_dir: Path, accelerator, console: Console) -> dict:
    main = accelerator.is_main_process
    logger = _file_logger(run_dir / LOG_FILE) if main else logging.getLogger("dynbert.worker")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.seed)

    spec = get_task(cfg.task.name)
    splits = load_splits(cfg, spec)
    model, tokenizer = build_model(cfg.model, spec, cfg.task.max_length, all_texts(splits["train"]))
    gated = make_gated_model(model, cfg.method, cfg.task.max_length)
    encoded = {name: encode(examples, tokenizer, cfg.task.max_length, spec) for name, examples in splits.items()}
    try:
        gated.method.calibrate(encoded["train"].lengths, gated.encoder.dims)
    except ValueError as error:  # a target the method cannot reach on this data
        raise DynbertError(f"bad method setting: {error}") from error

    state = fit(gated, encoded["train"], cfg, run_dir, spec, accelerator, logger, console)

    metrics = None
    if main:
        gated = accelerator.unwrap_model(gated)
        metrics = evaluate(gated, encoded, spec, cfg.train.eval_batch_size, accelerator.autocast)
        save_model(gated, tokenizer, run_dir / MODEL_DIR)
        lam = float(cfg["lambda"])
        metrics.update(task=spec.name, method=cfg.method.name, baseline=cfg.method.name == "none", seed=cfg.seed,
                       version=__version__, train_seconds=round(state.seconds, 2), steps=state.step,
                       run_dir=str(run_dir), score_name=cfg.method.get("score"), precision=cfg.train.precision,
                       device=str(accelerator.device), model=cfg.model.name, commit=source_commit())
        metrics["lambda"] = lam
        # What the report groups and labels runs by: the method's knob (None for the baseline).
        knob = knob_key(cfg.method)
        metrics["knob"] = knob
        metrics["knob_value"] = None if knob is None else float(OmegaConf.select(cfg, knob))
        # A FLOPs target, and the multiplier learned to reach it (what λ would have had to be).
        metrics["target"] = cfg.method.get("target")
        flops_target = gated.method.flops_target
        metrics["multiplier"] = None if flops_target is None else flops_target.multiplier
        metrics["warnings"] = run_warnings(metrics, lam, gated.method)
        atomic_write_json(run_dir / METRICS_FILE, metrics)
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        (run_dir / CHECKPOINT_SUM_FILE).unlink(missing_ok=True)
        logger.info("done: %s", {k: metrics[k] for k in ("score", "score_soft", "flops_ratio", "warnings")})
    accelerator.wait_for_everyone()
    return metrics if main else read_complete_metrics(run_dir)


def source_commit() -> str | None:
    """The git commit of the dynbert source this run trained with (``-dirty`` with uncommitted
    changes), so a result can be traced to its code; None outside a git checkout."""
    import subprocess

    source = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        changed = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no", "."],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip()[:12] + ("-dirty" if changed.stdout.strip() else "")


def load_run(run_dir: Path) -> GatedModel:
    """The trained, pruned model of a finished run folder (its decisions are exactly 0/1)."""
    run_dir = Path(run_dir).expanduser()
    cfg = load_run_config(run_dir)
    gated, _ = load_model(run_dir / MODEL_DIR, cfg.method, cfg.task.max_length)
    return gated


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
# Optimizer and schedules


def _optimizer(gated: GatedModel, cfg: DictConfig) -> tuple[torch.optim.Optimizer, list]:
    """AdamW: the encoder at train.lr with weight decay (not on biases and norms, as its adapter
    names them); the method's own parameters at the rates and schedules it asks for.

    Returns the optimizer and each group's lr schedule, a factor of ``(step, total_steps)``.
    """
    decay, no_decay = [], []
    for name, param in gated.model.named_parameters():
        (no_decay if gated.encoder.no_decay(name) else decay).append(param)
    groups = [dict(params=decay, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay),
              dict(params=no_decay, lr=cfg.train.lr, weight_decay=0.0)]
    schedules = [None, None]
    for group in gated.method.param_groups():
        schedules.append(group.pop("schedule"))
        groups.append(group)
    return torch.optim.AdamW(groups), schedules


def _scheduler(optimizer, schedules: list, total_steps: int, warmup_ratio: float):
    """The encoder: linear warm-up then linear decay. The method's groups: their own schedules."""
    warmup = int(warmup_ratio * total_steps)

    def encoder(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    lambdas = [encoder if schedule is None else (lambda step, s=schedule: s(step, total_steps))
               for schedule in schedules]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    if spec.is_regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels)
    return F.cross_entropy(logits.float(), labels)


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, spec: TaskSpec, temperature: float) -> torch.Tensor:
    """How far the pruned model's outputs are from the un-pruned model's (Hinton et al.: KL between
    temperature-softened distributions, times T², so its gradients keep their scale; MSE for STS-B)."""
    if spec.is_regression:
        return F.mse_loss(logits.float(), teacher.float())
    log_student = F.log_softmax(logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class LoopState:
    step: int = 0
    seconds: float = 0.0


def fit(gated: GatedModel, data: Encoded, cfg: DictConfig, run_dir: Path, spec: TaskSpec, accelerator,
        logger: logging.Logger, console: Console) -> LoopState:
    """Train ``gated`` in place; resume from and save ``checkpoint.pt``; return the loop's state."""
    tcfg = cfg.train
    accumulate = tcfg.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(data) / tcfg.batch_size / accumulate)
    if steps_per_epoch == 0:
        raise DynbertError(f"task {spec.name} has no training examples")
    total_steps = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps:
        total_steps = min(total_steps, tcfg.max_steps)
    optimizer, schedules = _optimizer(gated, cfg)
    scheduler = _scheduler(optimizer, schedules, total_steps, tcfg.warmup_ratio)
    checkpoint = run_dir / CHECKPOINT_FILE
    state, rng = LoopState(), None
    if checkpoint.is_file():
        state, rng = _restore(load_checkpoint(checkpoint), checkpoint, gated, optimizer, scheduler)
        logger.info("resumed from step %d", state.step)
        console.print(f"resuming {run_dir} from step {state.step}")
    method = gated.method  # the same module whether or not Accelerate wraps the model
    schedule_warning = method.schedule_warning(total_steps) if method.knob_active(float(cfg["lambda"])) else None
    if schedule_warning and accelerator.is_main_process:
        console.print(f"[yellow]warning:[/] {schedule_warning}", highlight=False, soft_wrap=True)
        logger.warning(schedule_warning)
    if method.idle_parameters:
        # Several processes: DDP waits for every parameter's gradient unless told some may have none.
        from accelerate.utils import DistributedDataParallelKwargs

        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    model, optimizer = accelerator.prepare(gated, optimizer)
    method.begin_step(state.step, total_steps)  # a resumed run re-enters its stage
    if rng is not None:  # last, so that nothing between the restore and the next step draws from it
        _set_rng_state(rng)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes

    model.train()
    first_step, started, seconds_before = state.step, time.perf_counter(), state.seconds
    saved_step = state.step if checkpoint.is_file() else None

    def save(step: int) -> None:
        nonlocal saved_step
        state.seconds = seconds_before + time.perf_counter() - started
        if main:
            save_checkpoint(checkpoint, _checkpoint_state(accelerator.unwrap_model(model), optimizer,
                                                          scheduler, step, state.seconds))
        saved_step = step

    def not_finite(what: str, detail: str) -> DynbertError:
        kept = (f"the checkpoint of step {saved_step} is kept in {run_dir}" if saved_step is not None
                else "no checkpoint was saved yet")
        return DynbertError(f"{what} is not finite at step {state.step + 1} ({detail}); training stopped and "
                            f"{kept}: lower train.lr or method.lr and start over with train.overwrite=true")

    # Off a terminal (logs, sweeps) a progress bar would only print blank lines: train.log has it.
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=console,
                        transient=True, disable=not (console.is_terminal and main))
    epoch_cache: dict[int, list[list[int]]] = {}
    try:
        # A stop signal is only recorded inside the loop and acted on between steps: raised anywhere
        # (after the optimizer step, before the step counter moves), it would checkpoint updated
        # weights under the old step, and the resumed run would take that step twice.
        with stop.deferred(), progress:
            bar = progress.add_task(f"{spec.name} {cfg.method.name} {cfg.method.knob}", total=total_steps, completed=state.step, stats="")
            while True:  # a stop in the last step, too, takes effect before the evaluation
                if stop.requested() is not None:
                    raise stop.Interrupted(stop.requested())
                if state.step >= total_steps:
                    break
                micro_batches = []
                for micro in range(accumulate):
                    indices = _step_batch(data, cfg, state.step * accumulate + micro, epoch_cache)
                    micro_batches.append(collate(data, indices[rank::world] or indices[:1]).to(accelerator.device))
                try:
                    loss_task, parts, out = train_step(model, gated, micro_batches, state.step, total_steps, cfg,
                                                       spec, optimizer, scheduler, accelerator)
                except NotFinite as error:
                    raise not_finite(error.what, error.detail) from None
                state.step += 1

                speed = (state.step - first_step) * tcfg.batch_size * accumulate / (time.perf_counter() - started)
                stats = _step_stats(loss_task, parts, out, method.flops_target) + f" {speed:.0f} ex/s"
                progress.update(bar, completed=state.step, stats=stats)
                if state.step % 50 == 0 or state.step == total_steps:
                    logger.info("step %d/%d %s", state.step, total_steps, stats)
                # The last step too: a run stopped while it evaluates then resumes without retraining.
                if (state.step % tcfg.checkpoint_every == 0 or state.step % steps_per_epoch == 0
                        or state.step == total_steps):
                    save(state.step)
    except (KeyboardInterrupt, SystemExit) as interrupt:
        if saved_step != state.step:
            with stop.deferred():  # a second Ctrl-C must not cut this checkpoint short
                save(state.step)
        if isinstance(interrupt, SystemExit):  # a launcher stopping the job (submitit requeues it)
            raise
        signum = getattr(interrupt, "signum", 2)
        name = "interrupted" if signum == 2 else "stopped by SIGTERM"
        raise TrainingInterrupted(f"{name} at step {state.step}/{total_steps}; a checkpoint is saved in "
                                  f"{run_dir}: run the same command again to resume",
                                  exit_code=128 + signum) from None
    state.seconds = seconds_before + time.perf_counter() - started
    return state


class NotFinite(DynbertError):
    """A loss or gradient that is not finite: the step stopped before it reached the weights."""

    def __init__(self, what: str, detail: str):
        super().__init__(f"{what} is not finite ({detail})")
        self.what, self.detail = what, detail


def train_step(model, gated: GatedModel, micro_batches: list[Batch], step: int, total_steps: int,
               cfg: DictConfig, spec: TaskSpec, optimizer, scheduler,
               accelerator) -> tuple[torch.Tensor, RegularizerParts | None, GatedOutput]:
    """One optimizer step, what `fit` and `dynbert bench --train` both run: for each micro-batch the
    forward, the task loss plus the method's regularizer, and the backward; then clipping, AdamW,
    the lr schedule and the method's projection.

    ``model`` is ``gated`` as ``accelerator.prepare`` returned it (perhaps wrapped): the method and
    the parameters to clip are read from ``gated``, whichever it is (the bench passes plain HF models
    in a wrapper with the same ``model``, ``method`` and call). Returns the last micro-batch's task
    loss, regularizer parts and output; raises ``NotFinite`` before a bad step changes a weight.
    """
    method, lam = gated.method, float(cfg["lambda"])
    method.begin_step(step, total_steps)
    for micro, batch in enumerate(micro_batches):
        last = micro == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                out = model(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            loss_task = task_loss(out.logits, batch.labels, spec)
            if cfg.train.distill > 0:  # learn the un-pruned model's outputs too (detached)
                with torch.no_grad(), accelerator.autocast():
                    teacher = model(batch.input_ids, batch.attention_mask, batch.token_type_ids, prune=False).logits
                weight = cfg.train.distill
                loss_task = ((1 - weight) * loss_task
                             + weight * distillation_loss(out.logits, teacher, spec, cfg.train.distill_temperature))
            parts = method.regularizer(out, lam, step, total_steps)
            loss = loss_task if parts is None else loss_task + parts.total
            if not torch.isfinite(loss):
                detail = f"task {loss_task.item():.4g}"
                if parts is not None:
                    detail += f", sparsity {parts.sparsity.item():.4g}, bimodal {parts.bimodal.item():.4g}"
                raise NotFinite("loss", detail)
            accelerator.backward(loss / len(micro_batches))
    grad_norm = accelerator.clip_grad_norm_(gated.model.parameters(), cfg.train.max_grad_norm)
    # A finite loss can still have an infinite gradient: stop before it reaches the weights (and the
    # next checkpoint). With fp16 loss scaling, the scaler skips such steps itself.
    if not torch.isfinite(grad_norm) and cfg.train.precision != "fp16":
        raise NotFinite("the gradient", f"norm {grad_norm.item():.4g}, loss {loss.item():.4g}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    method.after_step()
    return loss_task, parts, out


def _step_batch(data: Encoded, cfg: DictConfig, batch_number: int, cache: dict) -> list[int]:
    """The example indices of training batch ``batch_number`` (counted from the first epoch)."""
    per_epoch = math.ceil(len(data) / cfg.train.batch_size)
    epoch, offset = divmod(batch_number, per_epoch)
    if epoch not in cache:
        cache.clear()
        cache[epoch] = epoch_batches(data.lengths, cfg.train.batch_size, cfg.seed, epoch,
                                     cfg.train.group_by_length)
    return cache[epoch][offset]


def _step_stats(loss_task, parts, out, flops_target) -> str:
    text = f"task {loss_task.item():.3f}"
    if parts is not None:
        kept = (out.kept.float() / out.num_tokens.float()[:, None]).mean(dim=0)
        text += (f" sparsity {parts.sparsity.item():.3f} bimodal {parts.bimodal.item():.4f}"
                 f" kept {' '.join(f'{k:.2f}' for k in kept.tolist())}")
    if out.flops_ratio_soft is not None:
        text += f" FLOPs {out.flops_ratio_soft.item():.3f}"
    if flops_target is not None:
        text += f" multiplier {flops_target.multiplier:.3f}"
    return text


def _checkpoint_state(gated: GatedModel, optimizer, scheduler, step: int, seconds: float) -> dict:
    """Everything a resume needs, as tensors and numbers (loadable with weights_only=True)."""
    state = {"model": gated.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "step": step, "seconds": seconds}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _restore(saved: dict, path: Path, gated: GatedModel, optimizer, scheduler) -> tuple[LoopState, dict]:
    """Load a checkpoint (saved on any device) into the model, optimizer and scheduler before
    Accelerate moves them to this run's device; return the loop's state and the random generators'
    states, which the caller sets last (``_set_rng_state``)."""
    try:
        gated.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if not (isinstance(saved["rng"], torch.Tensor) and saved["rng"].dtype == torch.uint8):
            raise TypeError("the random generator's state is not a byte tensor")
        rng = {"rng": saved["rng"], "cuda_rng": saved.get("cuda_rng")}
        return LoopState(step=int(saved["step"]), seconds=float(saved["seconds"])), rng
    except Exception as error:  # noqa: BLE001 - a checkpoint of another model or version
        raise DynbertError(f"{path} is not a usable checkpoint ({error.__class__.__name__}); delete it "
                           "to restart this run, or pass train.overwrite=true") from error


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["rng"])
    cuda = rng["cuda_rng"]
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
