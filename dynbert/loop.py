"""The optimizer step and what it is made of: the one both training (``train.fit``) and the training
bench (``train_bench.py``) run, so the bench times the loop itself and not a copy of it.

Accelerate places the model and batches and runs mixed precision, as HF ``run_glue_no_trainer.py``
does; the encoder learns at ``train.lr`` with warm-up and decay, the method's own parameters at the
rates and schedules it asks for (``TokenPruner.param_groups``).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from omegaconf import DictConfig
from torch.nn import functional as F

from .core import GatedModel, GatedOutput, RegularizerParts
from .data import Batch
from .errors import DynbertError
from .tasks import TaskSpec

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
"""train.precision -> Accelerate's mixed_precision."""


def precision_autocast(precision: str, device: torch.device):
    """What ``accelerator.autocast`` is for ``train.precision`` on ``device`` (a context manager factory):
    a run's predictions made under it are the ones its evaluation made."""
    if PRECISIONS[precision] == "no":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device.type, dtype=dtype)


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


def make_optimizer(gated: GatedModel, cfg: DictConfig) -> tuple[torch.optim.Optimizer, list]:
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


def make_scheduler(optimizer, schedules: list, total_steps: int, warmup_ratio: float):
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
