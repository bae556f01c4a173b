"""One gated fine-tuning run: ``train(cfg) -> metrics``, what `dynbert train`, the sweep and tests call.

The loop follows HF ``run_glue_no_trainer.py``: Accelerate places the model and batches (CUDA,
MPS or CPU; several GPUs with ``accelerate launch``), runs mixed precision (bf16 or fp16 with loss
scaling) and leaves the loop in plain sight. The run folder (``rundir.py``), the batches
(``data.py``), the optimizer step (``loop.py``) and evaluation (``evaluate.py``) live beside it.
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

from . import stop
from .core import GatedModel
from .data import Encoded, collate, encode, epoch_batches, load_splits
from .declarations import knob_active, method_knob, run_knob
from .errors import DynbertError, atomic_write_json
from .evaluate import evaluate, predict, run_warnings
from .loop import NotFinite, make_accelerator, make_optimizer, make_scheduler, train_step
from .modeling import build_model, make_gated_model, save_model
from .rundir import (CHECKPOINT_FILE, CHECKPOINT_SUM_FILE, LOG_FILE, METRICS_FILE, MODEL_DIR, RunLock, claim,
                     load_checkpoint, read_complete_metrics, save_checkpoint)
from .tasks import TaskSpec, all_texts, get_task
from .version import __version__


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
    # A FLOPs target is met on the lengths of the inputs `method.target_inputs` names (methods/target.py):
    # dev's where a method asks for them, since a task may train on shorter texts than it is scored on.
    calibration = spec.eval_splits[0] if cfg.method.get("target_inputs", "train") == "dev" else "train"
    try:
        gated.method.calibrate(encoded[calibration].lengths, gated.encoder.dims)
    except ValueError as error:  # a target the method cannot reach on this data
        raise DynbertError(f"bad method setting: {error}") from error

    def hard_ratio() -> float:  # hard mode's FLOPs ratio on the target inputs (a method's `settle`)
        result = predict(gated, encoded[calibration], cfg.train.eval_batch_size, True, spec, accelerator.autocast)
        gated.train()
        return float(result["flops"].sum() / result["baseline_flops"].sum())

    state = fit(gated, encoded["train"], cfg, run_dir, spec, accelerator, logger, console, hard_ratio)

    metrics = None
    if main:
        gated = accelerator.unwrap_model(gated)
        metrics = evaluate(gated, encoded, spec, cfg.train.eval_batch_size, accelerator.autocast)
        save_model(gated, tokenizer, run_dir / MODEL_DIR)
        lam = float(cfg["lambda"])
        # A method without a knob prunes nothing: the un-pruned baseline.
        metrics.update(task=spec.name, method=cfg.method.name, baseline=method_knob(cfg.method) is None, seed=cfg.seed,
                       version=__version__, train_seconds=round(state.seconds, 2), steps=state.step,
                       run_dir=str(run_dir), score_name=cfg.method.get("score"), precision=cfg.train.precision,
                       device=str(accelerator.device), model=cfg.model.name, commit=source_commit())
        metrics["lambda"] = lam
        # What the report groups and labels runs by: the run's knob (a target, or its method's; None for
        # the baseline).
        knob = run_knob(cfg)
        metrics["knob"] = None if knob is None else knob.key
        metrics["knob_value"] = None if knob is None else float(OmegaConf.select(cfg, knob.key))
        # A FLOPs target, and the multiplier learned to reach it (what λ would have had to be).
        metrics["target"] = cfg.method.get("target")
        flops_target = gated.method.flops_target
        metrics["multiplier"] = None if flops_target is None else flops_target.multiplier
        metrics["warnings"] = run_warnings(metrics, knob_active(cfg), gated.method)
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
    """A finished run's pruned model (its decisions exactly 0/1), on the CPU: ``predictor.load``'s, the one
    run loader, for callers that want the model alone."""
    from .predictor import load

    return load(run_dir, "cpu").gated


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
# The loop


@dataclass
class LoopState:
    step: int = 0
    seconds: float = 0.0


def fit(gated: GatedModel, data: Encoded, cfg: DictConfig, run_dir: Path, spec: TaskSpec, accelerator,
        logger: logging.Logger, console: Console, hard_ratio) -> LoopState:
    """Train ``gated`` in place; resume from and save ``checkpoint.pt``; return the loop's state.
    ``hard_ratio``: hard mode's FLOPs ratio on the target inputs, for a method that settles its
    decisions on them (``TokenPruner.settle``)."""
    tcfg = cfg.train
    accumulate = tcfg.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(data) / tcfg.batch_size / accumulate)
    if steps_per_epoch == 0:
        raise DynbertError(f"task {spec.name} has no training examples")
    total_steps = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps:
        total_steps = min(total_steps, tcfg.max_steps)
    optimizer, schedules = make_optimizer(gated, cfg)
    scheduler = make_scheduler(optimizer, schedules, total_steps, tcfg.warmup_ratio)
    checkpoint = run_dir / CHECKPOINT_FILE
    state, rng = LoopState(), None
    if checkpoint.is_file():
        state, rng = _restore(load_checkpoint(checkpoint), checkpoint, gated, optimizer, scheduler)
        logger.info("resumed from step %d", state.step)
        console.print(f"resuming {run_dir} from step {state.step}")
    method = gated.method  # the same module whether or not Accelerate wraps the model
    schedule_warning = method.schedule_warning(total_steps) if knob_active(cfg) else None
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
            bar = progress.add_task(f"{spec.name} {cfg.run_name}", total=total_steps, completed=state.step, stats="")
            while True:  # a stop in the last step, too, takes effect before the evaluation
                if stop.requested() is not None:
                    raise stop.Interrupted(stop.requested())
                # Before step state.step, and once more after the last (step == total_steps). A stop that
                # comes meanwhile takes effect after the step, or here after the last: never between a
                # settle and its step's checkpoint, so a resumed run settles from the same state.
                settled = method.settle(state.step, total_steps, hard_ratio)
                if settled:
                    logger.info("step %d: %s", state.step, settled)
                if state.step >= total_steps:
                    if stop.requested() is not None:
                        raise stop.Interrupted(stop.requested())
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
