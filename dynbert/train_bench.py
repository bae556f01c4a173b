"""Training benchmark: how fast the training loop runs, and what gates, length grouping and bf16 change.

``dynbert bench --train`` times the loop's own optimizer step (``loop.train_step``: forward, task
loss plus the method's regularizer, backward, clipping, AdamW, the lr schedule, with the loop's
``make_optimizer``, ``make_scheduler`` and ``task_loss``) on real data, in four settings over the same
examples:

- ``plain``: the family's own HF ``*ForSequenceClassification`` (sdpa attention, no pruning) in
  the same step, batches in random order, fp32: the denominator of every ratio;
- ``gated``: the default method (the paper's gates, ``conf/method/gates.yaml``) as training runs
  it (soft mode, scoring in every pruned layer, the regularizer), random order, fp32;
- ``gated+grouped``: the same with length-grouped batches (``data.epoch_batches``,
  ``train.group_by_length=true``): the same examples, batches of similar lengths, less padding;
- ``gated+grouped+bf16``: and ``train.precision=bf16`` (Accelerate's autocast over fp32 master
  weights, what ``dynbert train train.precision=bf16`` runs; AVX512-BF16/AMX CPUs and GPUs).

The issue's targets (MiniLM on SST-2, batch 32, the 2-core CPU): gated >= 0.95 x plain, grouped
>= 1.5 x ungrouped, bf16 >= 1.3 x fp32, all three together >= 2 x plain. Measure them on a quiet
machine with (GLUE's SST-2 folder, and MiniLM saved with ``save_pretrained``)::

    dynbert bench --train --data /work/shared/data/glue/SST-2 --model /work/shared/data/models/all-MiniLM-L6-v2

Without ``--data`` and ``--model`` it runs the generated synthetic task on the tiny model (the
defaults of ``dynbert train``); ``--quick`` takes fewer steps (seconds on the tiny model).

How: a pool of steps x batch-size examples is drawn at random (seeded) from the training split
and cut into batches twice, in random order and length-grouped; each order covers every pool
example once (full mode's pool is one grouping chunk of ``GROUP_CHUNK_BATCHES`` batches, as
training groups them). Batches are collated before the clock starts. Every setting starts from
the same weights, runs ``warmup`` untimed steps, then ``rounds`` timed passes over all its batches;
a pass's throughput is its examples (and real, unpadded tokens) over its seconds, and the median
pass is reported. The settings run one after another, not interleaved, because Accelerate keeps
one precision per process: on a loaded machine their ratios move with the load.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dynbert.config import compose_config
from dynbert.console import print_table
from dynbert.data import GROUP_CHUNK_BATCHES, collate, encode, epoch_batches, load_splits
from dynbert.encoders import adapter_for
from dynbert.errors import DynbertError, atomic_write_json
from dynbert.loop import make_accelerator, make_optimizer, make_scheduler, train_step
from dynbert.measure import check_out, machine, progress, resolve_device, synchronize
from dynbert.methods import registered
from dynbert.modeling import build_model, make_gated_model
from dynbert.tasks import TASKS, all_texts, get_task

TRAIN_BENCH_FILE = "train_bench.json"


@dataclass(frozen=True)
class Setting:
    name: str
    gated: bool
    grouped: bool
    precision: str


SETTINGS = (Setting("plain", gated=False, grouped=False, precision="fp32"),
            Setting("gated", gated=True, grouped=False, precision="fp32"),
            Setting("gated+grouped", gated=True, grouped=True, precision="fp32"),
            Setting("gated+grouped+bf16", gated=True, grouped=True, precision="bf16"))
TARGETS = (("gated", "plain", 0.95), ("gated+grouped", "gated", 1.5),
           ("gated+grouped+bf16", "gated+grouped", 1.3), ("gated+grouped+bf16", "plain", 2.0))
"""(setting, the setting it is compared with, the issue's lowest ratio of examples per second)."""

FULL = dict(steps=GROUP_CHUNK_BATCHES, rounds=3, warmup=3)
"""One grouping chunk of steps, so the pool's batches group as training groups them."""
QUICK = dict(steps=4, rounds=3, warmup=1)


class PlainClassifier(nn.Module):
    """HF's own classifier (sdpa attention where the family has it, no pruning) with what
    ``loop.train_step`` reads of a ``GatedModel``: ``model``, ``encoder`` (which weights decay),
    ``method`` (none: no regularizer) and the call ``(input_ids, attention_mask, token_type_ids) ->
    output with .logits``."""

    def __init__(self, model: nn.Module, max_length: int):
        super().__init__()
        self.encoder = adapter_for(model)
        model.config._attn_implementation = self.encoder.plain_attention
        self.model = model
        self.method = registered("none")([], max_length)  # the un-pruned baseline: no regularizer

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **types)


def run_train_bench(*, quick: bool = False, data: str | os.PathLike | None = None,
                    model: str | os.PathLike | None = None, device: str = "auto", threads: int | None = None,
                    out: str | os.PathLike, console=None) -> dict:
    """Time training steps in every ``SETTINGS`` setting; write and return ``train_bench.json``.

    ``data``: a GLUE task folder (its name says the task, as GLUE's download names it: SST-2,
    CoLA, ...); default the synthetic task. ``model``: a checkpoint folder (weights and tokenizer);
    default the tiny model. ``device``: auto, cpu or cuda. ``threads``: torch threads (restored
    after). ``out``: a folder (``out/train_bench.json``) or a ``.json`` path.
    """
    from rich.console import Console

    console = console or Console()
    path = check_out(out, TRAIN_BENCH_FILE)
    torch_device = resolve_device(device)
    if threads is not None and threads < 1:
        raise DynbertError(f"threads must be at least 1, got {threads}")
    groups = ["model=tiny"]
    if data is not None:
        groups.append(f"task={_task_of_folder(Path(data).expanduser())}")
    if model is not None and not Path(model).expanduser().is_dir():
        raise DynbertError(f"--train --model {model} is not a folder: pass a checkpoint folder (weights and "
                           "tokenizer), or no --model for the tiny model")
    cfg = compose_config(groups)
    cfg.task.data_dir = None if data is None else str(Path(data).expanduser())
    cfg.model.name_or_path = None if model is None else str(Path(model).expanduser())
    cfg.train.device = device
    preset = QUICK if quick else FULL

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result = _bench(cfg, preset, torch_device, console)
    finally:
        torch.set_num_threads(previous_threads)
    result.update(quick=quick, data=cfg.task.data_dir, model=cfg.model.name_or_path or "tiny")

    atomic_write_json(path, result)
    _print_table(console, result)
    return result


def _task_of_folder(folder: Path) -> str:
    if not folder.is_dir():
        raise DynbertError(f"--data {folder} is not a folder: pass a GLUE task folder such as glue/SST-2")
    by_folder = {spec.folder.lower(): name for name, spec in TASKS.items() if spec.folder}
    if folder.name.lower() not in by_folder:
        raise DynbertError(f"--data {folder}: its name is not one of GLUE's task folders "
                           f"({', '.join(spec.folder for spec in TASKS.values() if spec.folder)}), "
                           "which says the task: keep the name GLUE's download gives it")
    return by_folder[folder.name.lower()]


def _bench(cfg, preset: dict, device: torch.device, console) -> dict:
    load_start, started = os.getloadavg()[0], time.perf_counter()
    torch.manual_seed(cfg.seed)
    spec = get_task(cfg.task.name)
    examples = load_splits(cfg, spec)["train"]
    batch_size = cfg.train.batch_size
    steps = min(preset["steps"], len(examples) // batch_size)
    if steps < 1:
        raise DynbertError(f"task {spec.name} has {len(examples)} training examples, fewer than one batch "
                           f"of {batch_size}")
    hf_model, tokenizer = build_model(cfg.model, spec, cfg.task.max_length, all_texts(examples))
    pool = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed))[: steps * batch_size]
    encoded = encode([examples[i] for i in pool.tolist()], tokenizer, cfg.task.max_length, spec)
    real_tokens = sum(encoded.lengths)

    rows = []
    for setting in SETTINGS:
        progress(console, started, f"{setting.name}: {preset['warmup']} warm-up steps, then {preset['rounds']} "
                                    f"passes of {steps} steps")
        order = epoch_batches(encoded.lengths, batch_size, cfg.seed, 0, setting.grouped)
        batches = [collate(encoded, indices) for indices in order]
        seconds = _time_setting(setting, cfg, spec, copy.deepcopy(hf_model), batches, preset, device)
        median = statistics.median(seconds)
        padded_tokens = sum(batch.input_ids.numel() for batch in batches)
        rows.append(dict(setting=setting.name, examples_per_second=len(encoded) / median,
                         tokens_per_second=real_tokens / median, padding_fraction=1 - real_tokens / padded_tokens,
                         round_seconds=seconds))
    plain = rows[0]["examples_per_second"]
    for row in rows:
        row["ratio_to_plain"] = row["examples_per_second"] / plain
    speed = {row["setting"]: row["examples_per_second"] for row in rows}
    targets = [dict(setting=setting, versus=versus, ratio=speed[setting] / speed[versus], target=target,
                    met=speed[setting] / speed[versus] >= target) for setting, versus, target in TARGETS]
    return dict(machine=machine(device), torch=torch.__version__, threads=torch.get_num_threads(), task=spec.name,
                method=cfg.method.name, batch_size=batch_size, max_length=cfg.task.max_length, steps=steps,
                rounds=preset["rounds"], warmup_steps=preset["warmup"], examples=len(encoded),
                real_tokens=real_tokens, rows=rows, targets=targets,
                load_average=dict(start=load_start, end=os.getloadavg()[0]), wall_seconds=time.perf_counter() - started)


def _time_setting(setting: Setting, cfg, spec, weights: nn.Module, batches: list, preset: dict,
                  device: torch.device) -> list[float]:
    """Seconds of each timed pass over ``batches``, training ``weights`` as ``setting`` says."""
    cfg = copy.deepcopy(cfg)
    cfg.train.precision, cfg.train.group_by_length = setting.precision, setting.grouped
    accelerator = make_accelerator(cfg.train)
    trainee = (make_gated_model(weights, cfg.method, cfg.task.max_length) if setting.gated
               else PlainClassifier(weights, cfg.task.max_length))
    total_steps = preset["warmup"] + preset["rounds"] * len(batches)
    optimizer, schedules = make_optimizer(trainee, cfg)
    scheduler = make_scheduler(optimizer, schedules, total_steps, cfg.train.warmup_ratio)
    model, optimizer = accelerator.prepare(trainee, optimizer)
    model.train()
    batches = [batch.to(accelerator.device) for batch in batches]
    step = 0

    def one_step(batch) -> None:
        nonlocal step
        train_step(model, trainee, [batch], step, total_steps, cfg, spec, optimizer, scheduler, accelerator)
        step += 1

    for batch in batches[: preset["warmup"]]:
        one_step(batch)
    seconds = []
    for _ in range(preset["rounds"]):
        synchronize(device)
        begin = time.perf_counter()
        for batch in batches:
            one_step(batch)
        synchronize(device)
        seconds.append(time.perf_counter() - begin)
    return seconds


def _print_table(console, result: dict) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=f"dynbert bench --train: {result['task']}, {result['model']}, batch {result['batch_size']}, "
                        f"{result['machine']['device_name'] or result['machine']['device']}, "
                        f"{result['threads']} threads",
                  caption=f"median of {result['rounds']} passes of {result['steps']} steps; tokens: real, unpadded",
                  box=box.SIMPLE_HEAD)
    for column in ("setting", "examples/s", "tokens/s", "padding", "x plain"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for row in result["rows"]:
        table.add_row(row["setting"], f"{row['examples_per_second']:.1f}", f"{row['tokens_per_second']:.0f}",
                      f"{row['padding_fraction']:.0%}", f"{row['ratio_to_plain']:.2f}x")
    print_table(console, table)
    for target in result["targets"]:
        verdict = "[green]met[/]" if target["met"] else "[red]not met[/]"
        console.print(f"{target['setting']} vs {target['versus']}: {target['ratio']:.2f}x "
                      f"(target >= {target['target']}x, {verdict})")
