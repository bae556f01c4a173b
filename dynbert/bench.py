"""Benchmark: does pruned inference run as fast as its FLOPs say?

Token-pruning code that only *masks* closed tokens (the public code of LTP and Transkimmer) cuts
FLOPs on paper and saves no time. dynbert gathers the kept tokens, so later layers run on shorter
sequences; this module measures that, apart from training (nanoGPT's ``bench.py`` idea).

For each (schedule, mode, batch size, length) it times one forward pass against plain Hugging
Face BERT (sdpa attention, no gates) on the same inputs:

- schedule: how many tokens each layer keeps. ``full`` (nothing pruned); ``keep70`` ...
  ``keep10`` (the first gated layer keeps ceil(f·L) tokens, later layers keep what remains);
  ``power`` (a PoWER-BERT-like schedule: after gated layer l, ceil(L · 0.15^((l+1)/n)) tokens, so
  the last layer keeps 15%); ``learned`` (the given model's own gates, as they are).
  A schedule only sets the gate values; the mask matching module scores and ranks the tokens
  for real (the model's score, plus the other score for ``keep50`` so the two can be compared).
- mode: ``gather`` (hard mode, tokens physically removed) or ``mask`` (soft mode with the same
  0/1 gates: the masking-only approach; same math, nothing removed).

Per row: ``flops_ratio_analytic`` (``core.flops_per_example`` for the kept schedule over the
un-pruned one), ``flops_ratio_measured`` (torch's FLOP counter on the batch-of-one forward that
the row runs, over plain BERT's; for ``mask`` rows that is the masked forward, ~1.0: masking saves
nothing), ``seconds_median``, ``speedup`` (plain seconds / these seconds) and ``efficiency``
(speed-up x FLOPs ratio = speed-up ÷ FLOPs reduction; 1.0 means the time falls as the FLOPs do).

Timing runs round-robin (one forward of every configuration per round, for a group of one batch
size and length), so a noisy neighbour slows every configuration alike; the median over rounds is
reported (``seconds_min`` too). Warm-up runs one forward per distinct set of kernels and shapes.
FLOPs are counted under ``no_grad`` (the counter sees nothing under ``inference_mode``), timing
runs under ``inference_mode``.

Batch 1 cannot follow the FLOPs all the way: a layer's six weight products must read its weights
(7.1 M parameters, ~28 MB in fp32 for BERT-base) whatever the token count, and a CPU GEMM with
few rows runs far below its peak. On the 2-core machine of the README figures, one layer's
products took 1.8 ms for 1 token (the weight read, ~15 GB/s), 3.1 ms for 13 and 11 ms for 128:
time ≈ a floor + a per-token cost, so keeping 10% of 128 tokens gives ~3× rather than ~8×. In a
batch of 32 the floor is shared by 32 × L rows and time follows the FLOPs. bf16 halves the bytes
(and on CPUs with AVX512-BF16 or AMX doubles the product rate): 0.5 ms floor, 4.7 ms at 128 tokens.
``dtype="bf16"`` runs both models under ``torch.autocast``, which re-casts the fp32 weights on every
forward (~12% of a batch-1 forward); a model converted with ``.to(torch.bfloat16)`` avoids that.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from transformers import BertConfig, BertForSequenceClassification

from dynbert.core import SCORES, GatedModel, baseline_kept, count_matmul_flops, flops_per_example
from dynbert.methods.gates import Gates, gate_regularizer, layer_weights
from dynbert.errors import DynbertError, atomic_write_json, check_writable_folder

SCHEDULES = ("full", "keep70", "keep50", "keep30", "keep10", "power", "learned")
DEFAULT_SCHEDULES = ("full", "keep70", "keep50", "keep30", "keep10", "power")
MODES = ("gather", "mask")
DTYPES = ("fp32", "bf16")
PLAIN = "plain"
"""Schedule and mode name of the reference rows: HF's own BERT forward (sdpa), no gates."""

COMPARE_SCORE_ON = ("keep50",)
"""Schedules also benched with the score(s) the model does not use."""
POWER_LAST_FRACTION = 0.15
"""``power``: the fraction of tokens the last layer keeps; earlier layers decay geometrically."""

QUICK_MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
"""``quick``: a small BERT, so a smoke run finishes in seconds. Full mode: BertConfig defaults."""

FULL = dict(batch_sizes=(1, 32), seq_lens=(128, 64), budget_s=25.0, train_batch=8, train_len=128)
QUICK = dict(batch_sizes=(1, 8), seq_lens=(64,), budget_s=0.0, train_batch=4, train_len=64)
MIN_ROUNDS, MAX_ROUNDS, QUICK_ROUNDS = 3, 15, 3
"""Timed rounds per group: in full mode as many as fit ``budget_s`` seconds, within these bounds."""
TRAIN_STEPS = 5
"""Timed optimizer steps for the training overhead (after one warm-up step), median reported."""
HARD_FULL_ROUNDS = 8
"""Timed rounds for the nothing-pruned hard-mode overhead (full mode)."""

BENCH_FILE = "bench.json"


def bench_json_path(out: str | os.PathLike) -> Path:
    """Where ``run_bench`` writes: ``out`` itself if it ends in ``.json``, else ``out/bench.json``."""
    out = Path(out)
    return out if out.suffix == ".json" else out / BENCH_FILE


@dataclass
class _Config:
    """One timed configuration of a group: plain BERT, or the gated model in one setting."""

    schedule: str
    mode: str
    score: str | None
    raw: torch.Tensor | None = None
    """Gate raw values that realise the schedule at this length (None for plain)."""


def run_bench(*, quick: bool = False, batch_sizes: Sequence[int] | None = None,
              seq_lens: Sequence[int] | None = None, schedules: Sequence[str] | None = None,
              dtype: str = "fp32", model: GatedModel | None = None,
              model_config: BertConfig | dict | None = None, threads: int | None = None,
              repeats: int | None = None, warmup: int = 1, out: str | os.PathLike,
              console=None) -> dict:
    """Time gathered and masked pruning against plain BERT; write and return ``bench.json``.

    ``quick``: a small model, batch 1 and 8, length 64, 3 rounds: a smoke test (seconds).
    ``batch_sizes``/``seq_lens``: default (1, 32) and (128, 64); quick (1, 8) and (64,). With a
    ``model``, the default lengths are those within its gates' ``max_length`` (else that length).
    ``schedules``: names from ``SCHEDULES``; default all but ``learned``, plus ``learned`` when a
    ``model`` is given. ``model``: a GatedModel to bench (its weights, gates, gated layers and score);
    it is left as it was found. Without it, random weights of ``model_config`` (default: BERT-base
    sizes; quick: ``QUICK_MODEL``), gated at every layer, score ``attention_received``.
    ``dtype``: ``fp32`` or ``bf16`` (``torch.autocast`` on CPU). ``threads``: torch threads for
    the run (restored after). ``repeats``: timed rounds per (batch, length) group; default 3 in
    quick mode, else as many as fit ~25 s (3 to 15). ``warmup``: untimed rounds first
    (one forward per distinct kernel set and shape). ``out``: a folder (``out/bench.json``) or a ``.json`` file path; see ``bench_json_path``.
    """
    from rich.console import Console

    console = console or Console()
    path = bench_json_path(out)
    if path.is_dir():
        raise DynbertError(f"--out {out} is a folder named like a JSON file: pass another path")
    check_writable_folder(path.parent, "--out")
    preset = QUICK if quick else FULL
    batch_sizes = _positive_ints(batch_sizes or preset["batch_sizes"], "batch size")
    if not seq_lens and model is not None:  # a trained model's gates cover its own max length only
        seq_lens = [length for length in preset["seq_lens"] if length <= model.max_length] or [model.max_length]
    seq_lens = _positive_ints(seq_lens or preset["seq_lens"], "sequence length")
    if dtype not in DTYPES:
        raise DynbertError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
    if repeats is not None and repeats < 1:
        raise DynbertError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise DynbertError(f"warmup must be 0 or more, got {warmup}")
    if threads is not None and threads < 1:
        raise DynbertError(f"threads must be at least 1, got {threads}")
    if schedules is None:
        schedules = DEFAULT_SCHEDULES + (("learned",) if model is not None else ())
    schedules = list(dict.fromkeys(schedules))
    unknown = [name for name in schedules if name not in SCHEDULES]
    if unknown:
        raise DynbertError(f"unknown schedule(s) {unknown}; expected names from {SCHEDULES}")
    if "learned" in schedules and model is None:
        raise DynbertError("schedule 'learned' needs a trained model: it benches the model's own gates")
    if model is not None and model_config is not None:
        raise DynbertError("give either a model or a model_config, not both")
    if model is not None and not model.pruned_layers:
        raise DynbertError("the model prunes no layer (a method=none run): there is nothing to prune; "
                           "bench a pruned run, or no run for random BERT-base weights")
    if model is not None and not isinstance(model.method, Gates):
        raise DynbertError(f"bench --run times runs of method=gates; this run used {model.method.name}")

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        if model is None:
            gated, plain = _random_models(model_config if model_config is not None
                                          else (QUICK_MODEL if quick else {}), max(seq_lens), preset["train_len"])
        else:
            gated, plain = model, _plain_copy(model)
        too_long = [length for length in seq_lens if length > gated.max_length]
        if too_long:
            raise DynbertError(f"sequence length(s) {too_long} exceed the model's gate length "
                               f"{gated.max_length}")
        # The schedules overwrite the gates and the score: leave a given model as it was found.
        found = (gated.training, gated.method.score, gated.method.gates.raw.detach().clone())
        try:
            result = _bench(gated, plain, quick=quick, preset=preset, batch_sizes=batch_sizes,
                            seq_lens=seq_lens, schedules=schedules, dtype=dtype, repeats=repeats,
                            warmup=warmup, console=console)
        finally:
            training, gated.method.score, raw = found
            with torch.no_grad():
                gated.method.gates.raw.copy_(raw)
            gated.train(training)
    finally:
        torch.set_num_threads(previous_threads)

    atomic_write_json(path, result)
    _print_table(console, result)
    return result


# ---------------------------------------------------------------------------------------------
# Models


def _random_models(config: BertConfig | dict, max_length: int,
                   train_len: int) -> tuple[GatedModel, BertForSequenceClassification]:
    """Random weights (timing needs no training), fixed seed; plain BERT is a copy made before wrapping.

    The gates cover the longest benched length and the overhead measurements' length (within the
    model's positions), so those run at their documented length whatever ``seq_lens`` is.
    """
    if isinstance(config, dict):
        config = BertConfig(**{"num_labels": 2, **config})
    else:
        config = copy.deepcopy(config)
    if max_length > config.max_position_embeddings:
        raise DynbertError(f"sequence length {max_length} exceeds the model's "
                           f"{config.max_position_embeddings} positions")
    max_length = max(max_length, min(train_len, config.max_position_embeddings))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        bert = BertForSequenceClassification(config)
    plain = copy.deepcopy(bert)
    plain.config._attn_implementation = "sdpa"
    layers = config.num_hidden_layers
    return GatedModel(bert, Gates(list(range(layers)), max_length, layers)), plain.eval()


def _plain_copy(model: GatedModel) -> BertForSequenceClassification:
    """The given model's BERT without its gates, on transformers' own sdpa attention."""
    plain = copy.deepcopy(model.model)
    plain.config._attn_implementation = "sdpa"
    return plain.eval()


def schedule_gates(model: GatedModel, schedule: str, seq_len: int) -> torch.Tensor:
    """Raw gate values that make ``model`` follow ``schedule`` on inputs of ``seq_len`` tokens.

    Fixed schedules open the first k ranks of a gated layer (0/1 gates; ±inf for sigmoid gates).
    ``keepF`` prunes at the first gated layer (layer 0 when every layer is gated) and opens every
    later gate; ``power`` opens ceil(L · 0.15^((l+1)/n)) ranks at gated layer l of n layers.
    ``learned`` returns the model's gates unchanged.
    """
    raw = model.method.gates.raw.detach()
    if schedule == "learned":
        return raw.clone()
    keep = torch.full((len(model.pruned_layers),), seq_len)
    if schedule.startswith("keep"):
        keep[0] = math.ceil(int(schedule[4:]) / 100 * seq_len)
    elif schedule == "power":
        for row, layer in enumerate(model.pruned_layers):
            fraction = POWER_LAST_FRACTION ** ((layer + 1) / model.num_layers)
            keep[row] = math.ceil(fraction * seq_len)
    elif schedule != "full":
        raise DynbertError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    is_open = torch.arange(raw.size(1))[None, :] < keep[:, None]
    if model.method.gates.parametrization == "clip":
        return is_open.to(raw.dtype)
    return torch.where(is_open, math.inf, -math.inf).to(raw.dtype)


def _set(model: GatedModel, config: _Config) -> None:
    with torch.no_grad():
        model.method.gates.raw.copy_(config.raw)
    model.method.score = config.score


# ---------------------------------------------------------------------------------------------
# The benchmark


def _bench(gated: GatedModel, plain: BertForSequenceClassification, *, quick, preset, batch_sizes,
           seq_lens, schedules, dtype, repeats, warmup, console) -> dict:
    gated.eval()
    plain.eval()
    config = gated.model.config
    load_start, started = os.getloadavg()[0], time.perf_counter()
    _progress(console, started, "counting FLOPs (batch of one, every configuration)")
    model_score = gated.method.score
    pairs = [(schedule, model_score) for schedule in schedules]
    pairs += [(schedule, other) for schedule in schedules if schedule in COMPARE_SCORE_ON
              for other in SCORES if other != model_score]

    # Every schedule's gates, taken before any is set (``learned`` is the model's own gates).
    raws = {(schedule, length): schedule_gates(gated, schedule, length)
            for schedule in schedules for length in set(seq_lens)}

    # FLOPs and kept tokens depend on the length only (random tokens, no padding): count once.
    counted = {}
    for length in seq_lens:
        ids, mask = _inputs(1, length, config.vocab_size)
        plain_flops = count_matmul_flops(plain, input_ids=ids, attention_mask=mask)
        counted[PLAIN, PLAIN, None, length] = dict(kept_fraction=1.0, kept_per_layer=[length] * gated.num_layers,
                                                   flops_ratio_analytic=1.0, flops_ratio_measured=1.0)
        for schedule, score in pairs:
            raw = raws[schedule, length]
            for mode in MODES:
                _set(gated, _Config(schedule, mode, score, raw))
                outputs = []  # one forward gives both the FLOPs and the kept counts
                measured = count_matmul_flops(lambda: outputs.append(gated(ids, mask, hard=mode == "gather")))
                output = outputs[0]
                kept = output.kept
                dims = gated.encoder.dims
                analytic = (flops_per_example(output.num_tokens, kept, dims)
                            / flops_per_example(output.num_tokens, baseline_kept(output.num_tokens, gated.num_layers), dims))
                counted[schedule, mode, score, length] = dict(
                    kept_fraction=kept.double().mean().item() / length, kept_per_layer=kept[0].tolist(),
                    flops_ratio_analytic=analytic.item(), flops_ratio_measured=measured / plain_flops)

    rows, rounds_used = [], {}
    for batch in batch_sizes:
        for length in seq_lens:
            configs = [_Config(PLAIN, PLAIN, None)]
            configs += [_Config(schedule, mode, score, raws[schedule, length])
                        for schedule, score in pairs for mode in MODES]
            ids, mask = _inputs(batch, length, config.vocab_size)
            calls = [_forward_call(gated, plain, c, ids, mask) for c in configs]
            _progress(console, started, f"timing batch {batch}, length {length}: {len(configs)} configurations")
            times, rounds = _time_round_robin(calls, dtype=dtype, warmup=warmup,
                                              repeats=repeats or (QUICK_ROUNDS if quick else None),
                                              budget_s=preset["budget_s"])
            rounds_used[f"{batch}x{length}"] = rounds
            seconds = [statistics.median(t) for t in times]
            plain_seconds = seconds[0]
            for c, secs, each in zip(configs, seconds, times):
                facts = counted[c.schedule, c.mode, c.score, length]
                speedup = plain_seconds / secs
                rows.append(dict(schedule=c.schedule, mode=c.mode, score=c.score, batch_size=batch, seq_len=length,
                                 kept_fraction=facts["kept_fraction"], kept_per_layer=facts["kept_per_layer"],
                                 flops_ratio_analytic=facts["flops_ratio_analytic"],
                                 flops_ratio_measured=facts["flops_ratio_measured"], seconds_median=secs,
                                 seconds_min=min(each), speedup=speedup, efficiency=speedup * facts["flops_ratio_analytic"]))

    batch, length = preset["train_batch"], preset["train_len"]
    length = min(length, gated.max_length)
    _progress(console, started, f"timing hard mode with nothing pruned, batch {batch}, length {length}")
    hard_full = _hard_full_overhead(gated, plain, batch, length, dtype, warmup, quick, model_score)
    _progress(console, started, f"timing training steps, batch {batch}, length {length}")
    train = _train_step_overhead(gated, plain, batch, length, dtype, model_score)

    return dict(
        machine=_machine(), torch=torch.__version__, threads=torch.get_num_threads(), dtype=dtype, quick=quick,
        model=dict(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                   num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
                   gate_layers=list(gated.pruned_layers), score=model_score,
                   parametrization=gated.method.gates.parametrization),
        rounds=rounds_used, warmup=warmup, load_average=dict(start=load_start, end=os.getloadavg()[0]),
        rows=rows, train_step_overhead=train, hard_full_overhead=hard_full,
        wall_seconds=time.perf_counter() - started,
    )


def _progress(console, started: float, message: str) -> None:
    console.print(f"[dim]{time.perf_counter() - started:6.0f} s  {message}[/dim]")


def _inputs(batch: int, length: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids, every one real (no padding); a fixed seed so every run sees the same."""
    generator = torch.Generator().manual_seed(batch * 100_003 + length)
    low = 1000 if vocab_size > 2000 else 1
    ids = torch.randint(low, vocab_size, (batch, length), generator=generator)
    return ids, torch.ones_like(ids)


def _forward_call(gated, plain, config: _Config, ids, mask) -> tuple[tuple, Callable, Callable]:
    """(warm-up key, prepare, forward): prepare sets the gates and score outside the timed region.

    Configurations with the same key run the same kernels on the same shapes (masking runs at full
    length whatever the schedule), so one warm-up forward serves them all.
    """
    if config.mode == PLAIN:
        return (PLAIN,), (lambda: None), (lambda: plain(input_ids=ids, attention_mask=mask))
    hard = config.mode == "gather"
    key = (config.mode, config.score) + ((config.schedule,) if hard else ())
    return key, (lambda: _set(gated, config)), (lambda: gated(ids, mask, hard=hard))


def _autocast(dtype: str):
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _time_round_robin(calls, *, dtype, warmup, repeats, budget_s) -> tuple[list[list[float]], int]:
    """Seconds of each call's forward in every timed round (one of each per round, after ``warmup``).

    Warm-up rounds run one call per warm-up key. ``repeats=None``: as many rounds as fit
    ``budget_s`` at the warm-up's pace (``MIN_ROUNDS`` to ``MAX_ROUNDS``).
    """
    def run(index):
        _, prepare, forward = calls[index]
        prepare()
        with torch.inference_mode(), _autocast(dtype):
            begin = time.perf_counter()
            forward()
            return time.perf_counter() - begin

    first_of_key = {}
    for index, (key, _, _) in enumerate(calls):
        first_of_key.setdefault(key, index)
    pace = {}
    for _ in range(max(warmup, 1 if repeats is None else 0)):
        pace = {key: run(index) for key, index in first_of_key.items()}
    if repeats is None:
        repeats = min(MAX_ROUNDS, max(MIN_ROUNDS, int(budget_s / sum(pace[key] for key, _, _ in calls))))
    times = [[] for _ in calls]
    for _ in range(repeats):
        for index in range(len(calls)):
            times[index].append(run(index))
    return times, repeats


def _hard_full_overhead(gated, plain, batch, length, dtype, warmup, quick, score) -> dict:
    """Hard mode with every gate open (gathering nothing away) against plain BERT, per score."""
    ids, mask = _inputs(batch, length, gated.model.config.vocab_size)
    raw = schedule_gates(gated, "full", length)
    configs = [_Config(PLAIN, PLAIN, None)] + [_Config("full", "gather", score, raw) for score in SCORES]
    calls = [_forward_call(gated, plain, c, ids, mask) for c in configs]
    times, rounds = _time_round_robin(calls, dtype=dtype, warmup=warmup,
                                      repeats=QUICK_ROUNDS if quick else HARD_FULL_ROUNDS, budget_s=0.0)
    seconds = [statistics.median(t) for t in times]
    per_score = {c.score: dict(seconds=secs, overhead_percent=100 * (secs / seconds[0] - 1))
                 for c, secs in zip(configs[1:], seconds[1:])}
    return dict(batch_size=batch, seq_len=length, rounds=rounds, plain_seconds=seconds[0], score=score,
                overhead_percent=per_score[score]["overhead_percent"], by_score=per_score)


def _train_step_overhead(gated, plain, batch, length, dtype, score) -> dict:
    """One optimizer step of the gated model (soft mode) against one of plain BERT, same data.

    Gated: forward + cross-entropy + gate regularizer + backward + AdamW + gate projection.
    Plain: forward + cross-entropy + backward + AdamW. Copies are trained; the models are untouched.
    """
    config = gated.model.config
    ids, mask = _inputs(batch, length, config.vocab_size)
    labels = torch.arange(batch) % config.num_labels
    gated_copy, plain_copy = copy.deepcopy(gated).train(), copy.deepcopy(plain).train()
    gated_copy.method.score = score
    with torch.no_grad():
        gated_copy.method.gates.raw.fill_(1.0 if gated_copy.method.gates.parametrization == "clip" else 3.0)
    weights = layer_weights(gated_copy.pruned_layers, gated_copy.num_layers)
    gate_params = [gated_copy.method.gates.raw]
    gated_optimizer = torch.optim.AdamW([
        dict(params=list(gated_copy.model.parameters()), lr=2e-5, weight_decay=0.01),
        dict(params=gate_params, lr=1e-2, weight_decay=0.0)])
    plain_optimizer = torch.optim.AdamW(plain_copy.parameters(), lr=2e-5, weight_decay=0.01)

    def gated_step():
        gated_optimizer.zero_grad(set_to_none=True)
        with _autocast(dtype):
            output = gated_copy(ids, mask)
            loss = F.cross_entropy(output.logits.float(), labels)
            loss = loss + gate_regularizer(gated_copy.method.gates(), weights, lam=0.1, mu=0.5).total
        loss.backward()
        gated_optimizer.step()
        gated_copy.method.gates.project_()

    def plain_step():
        plain_optimizer.zero_grad(set_to_none=True)
        with _autocast(dtype):
            logits = plain_copy(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        plain_optimizer.step()

    steps = {"plain": [], "gated": []}
    for index in range(TRAIN_STEPS + 1):
        for name, step in (("plain", plain_step), ("gated", gated_step)):
            begin = time.perf_counter()
            step()
            if index:  # the first step of each is the warm-up (AdamW allocates its state)
                steps[name].append(time.perf_counter() - begin)
    plain_seconds, gated_seconds = (statistics.median(steps[name]) for name in ("plain", "gated"))
    return dict(batch_size=batch, seq_len=length, score=score, steps=TRAIN_STEPS,
                plain_seconds=plain_seconds, gated_seconds=gated_seconds,
                overhead_percent=100 * (gated_seconds / plain_seconds - 1))


def _machine() -> dict:
    cpu_model, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not cpu_model:
                cpu_model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_model=cpu_model, cpu_count=os.cpu_count(),
                bf16_instructions=sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}))


def _positive_ints(values: Sequence[int], what: str) -> list[int]:
    values = [int(value) for value in values]
    if not values or min(values) < (2 if what == "sequence length" else 1):
        raise DynbertError(f"every {what} must be at least {2 if what == 'sequence length' else 1}, got {values}")
    return values


# ---------------------------------------------------------------------------------------------
# Output


def _print_table(console, result: dict) -> None:
    from rich import box
    from rich.table import Table

    model = result["model"]
    table = Table(title=f"dynbert bench: {model['num_hidden_layers']} layers x {model['hidden_size']}, "
                        f"{result['dtype']}, {result['threads']} threads",
                  caption="FLOPs: analytic ratio to un-pruned; meas.: torch's counter, batch of one; "
                          "eff.: speed-up x FLOPs", box=box.SIMPLE_HEAD)
    for column in ("b", "L", "schedule", "score", "mode", "kept", "FLOPs", "meas.", "ms", "speed-up", "eff."):
        table.add_column(column, justify="left" if column in ("schedule", "score", "mode") else "right")
    previous = None
    for row in result["rows"]:
        group = (row["batch_size"], row["seq_len"])
        if previous is not None and group != previous:
            table.add_section()
        previous = group
        table.add_row(str(row["batch_size"]), str(row["seq_len"]), row["schedule"], _SHORT_SCORE[row["score"]],
                      row["mode"], f"{row['kept_fraction']:.2f}", f"{row['flops_ratio_analytic']:.3f}",
                      f"{row['flops_ratio_measured']:.3f}", f"{1000 * row['seconds_median']:.1f}",
                      f"{row['speedup']:.2f}x", f"{row['efficiency']:.2f}")
    console.print(table)
    hard, train = result["hard_full_overhead"], result["train_step_overhead"]
    per_score = ", ".join(f"{score} {facts['overhead_percent']:+.1f}%" for score, facts in hard["by_score"].items())
    console.print(f"hard mode, nothing pruned, vs plain BERT (batch {hard['batch_size']}, L {hard['seq_len']}): "
                  f"{per_score}")
    console.print(f"training step, gated ({train['score']}) vs plain BERT (batch {train['batch_size']}, "
                  f"L {train['seq_len']}): {train['overhead_percent']:+.1f}% "
                  f"({train['gated_seconds']:.3f} s vs {train['plain_seconds']:.3f} s)")


_SHORT_SCORE = {"attention_received": "recv", "cls_attention": "cls", None: ""}
