"""Benchmark: does pruned inference run as fast as its FLOPs say?

Token-pruning code that only *masks* closed tokens (the public code of LTP and Transkimmer) cuts
FLOPs on paper and saves no time. dynbert gathers the kept tokens, so later layers run on shorter
sequences; this module measures that, apart from training (nanoGPT's ``bench.py`` idea). The
training loop's own speed is measured by ``train_bench.py`` (``dynbert bench --train``).

For each (schedule, mode, batch size, length) it times one forward pass against the plain Hugging
Face classifier of the same family (``*ForSequenceClassification``, sdpa attention, no pruning) on
the same inputs:

- schedule: how many tokens each pruned layer keeps. ``full`` (nothing pruned); ``keep70`` ...
  ``keep10`` (the first pruned layer keeps ceil(f·L) tokens, later layers keep what remains);
  ``power`` (a PoWER-BERT-like schedule: after pruned layer l, ceil(L · 0.15^((l+1)/n)) tokens, so
  the last layer keeps 15%); ``learned`` (a trained run's own method, whatever it is, as trained).
  Fixed schedules are a registered method, ``schedule`` (``methods/schedule.py``), on the same
  weights: the kernel still scores and ranks the tokens for real (with the model's score, plus the
  other score for ``keep50`` so the two can be compared), only the number kept is fixed.
- mode: ``gather`` (hard mode, tokens physically removed) or ``mask`` (soft mode with the same
  decisions: the masking-only approach; same math, nothing removed).

The model: random weights of an encoder family's default sizes (``bert``, and every family with
an adapter in ``encoders/``), a local checkpoint folder's config (random weights: time depends on
shapes, not values), or a trained run (its weights and its method). Every model runs through the
engine's encoder adapter; nothing here knows a family's modules.

Per row: ``flops_ratio_analytic`` (``core.flops_ratio`` of ``GatedModel.flops``: the kept schedule
over the un-pruned one), ``flops_ratio_measured`` (torch's FLOP counter on the batch-of-one forward
that the row runs, over the plain model's; for ``mask`` rows that is the masked forward, ~1.0:
masking saves nothing), ``seconds_median``, ``speedup`` (plain seconds / these seconds) and
``efficiency`` (speed-up x FLOPs ratio = speed-up ÷ FLOPs reduction; 1.0 means the time falls as
the FLOPs do).

Timing runs round-robin (one forward of every configuration per round, for a group of one batch
size and length), so a noisy neighbour slows every configuration alike; the median over rounds is
reported (``seconds_min`` too). Warm-up runs one forward per distinct set of kernels and shapes.
On CUDA every timed forward sits between two ``torch.cuda.synchronize()`` calls, so the clock
reads the GPU's work, not the launch. FLOPs are counted under ``no_grad`` (the counter sees nothing
under ``inference_mode``), timing runs under ``inference_mode``.

``dtype`` bf16 or fp16 converts both models (``.to(dtype)``), as one deploys them: ``torch.autocast``
would re-cast the fp32 weights on every forward, ~12% of a batch-1 forward on the 2-core machine
of the README figures. fp16 needs CUDA (CPUs have no fast fp16 products).

Batch 1 cannot follow the FLOPs all the way: a layer's six weight products must read its weights
(7.1 M parameters, ~28 MB in fp32 for BERT-base) whatever the token count, and a CPU GEMM with
few rows runs far below its peak. On the 2-core machine of the README figures, one layer's
products took 1.8 ms for 1 token (the weight read, ~15 GB/s), 3.1 ms for 13 and 11 ms for 128:
time ≈ a floor + a per-token cost, so keeping 10% of 128 tokens gives ~3× rather than ~8×. In a
batch of 32 the floor is shared by 32 × L rows and time follows the FLOPs. bf16 halves the bytes
(and on CPUs with AVX512-BF16 or AMX doubles the product rate): 0.5 ms floor, 4.7 ms at 128 tokens.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dynbert.console import print_table
from dynbert.core import SCORES, GatedModel, TokenPruner, count_matmul_flops, flops_ratio
from dynbert.encoders import adapter_class, adapter_for, supported_model_types
from dynbert.errors import DynbertError, atomic_write_json
from dynbert.measure import DTYPES, check_out, machine, progress, resolve_device, time_round_robin
from dynbert.methods import registered
from dynbert.methods.schedule import SHAPES

SCHEDULES = (*SHAPES, "learned")
DEFAULT_SCHEDULES = SHAPES
MODES = ("gather", "mask")
PLAIN = "plain"
"""Schedule and mode name of the reference rows: the family's own HF forward (sdpa), no pruning."""

COMPARE_SCORE_ON = ("keep50",)
"""Schedules also benched with the score(s) the model does not use."""

DEFAULT_FAMILY = "bert"
QUICK_SIZES = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
"""``quick`` with a family: these sizes, so a smoke run finishes in seconds. Full mode: the family's
defaults (BERT-base for ``bert``)."""

FULL = dict(batch_sizes=(1, 32), seq_lens=(128, 64), budget_s=25.0)
QUICK = dict(batch_sizes=(1, 8), seq_lens=(64,), budget_s=0.0)
QUICK_ROUNDS = 3
"""Timed rounds per group in quick mode; in full mode as many as fit ``budget_s`` seconds
(``measure.MIN_ROUNDS`` to ``measure.MAX_ROUNDS``)."""

BENCH_FILE = "bench.json"


# ---------------------------------------------------------------------------------------------
# The inference benchmark


@dataclass
class _Config:
    """One timed configuration of a group: the plain model, or a pruned one in one mode."""

    schedule: str
    mode: str
    score: str | None
    model: nn.Module


def run_bench(*, quick: bool = False, model: str | os.PathLike | None = None, model_config: dict | None = None,
              run: str | os.PathLike | GatedModel | None = None, batch_sizes: Sequence[int] | None = None,
              seq_lens: Sequence[int] | None = None, schedules: Sequence[str] | None = None,
              device: str = "auto", dtype: str = "fp32", threads: int | None = None, repeats: int | None = None,
              warmup: int = 1, out: str | os.PathLike, console=None) -> dict:
    """Time gathered and masked pruning against the plain classifier; write and return ``bench.json``.

    ``quick``: batch 1 and 8, length 64, 3 rounds, and a family's model at ``QUICK_SIZES``: a
    smoke test (seconds). ``model``: a family name (default ``bert``; see
    ``encoders.supported_model_types()``) or a checkpoint folder (its config.json), random weights
    either way. ``model_config``: sizes to set on that config, by BERT's names (``hidden_size``,
    ``num_hidden_layers``, ...), instead of the quick sizes. ``run``: a trained run's folder (or its
    loaded ``GatedModel``, left untouched): its weights; adds the ``learned`` schedule, its own method.
    ``batch_sizes``/``seq_lens``: default (1, 32) and (128, 64); quick (1, 8) and (64,); with a run,
    the default lengths are those within its ``max_length`` (else that length). ``schedules``: names
    from ``SCHEDULES``; default all but ``learned``, plus ``learned`` with a run. ``device``: auto,
    cpu or cuda. ``dtype``: fp32, bf16 or fp16 (CUDA only), a converted model. ``threads``: torch
    threads (restored after). ``repeats``: timed rounds per (batch, length) group; default 3 in
    quick mode, else as many as fit ~25 s (3 to 15). ``warmup``: untimed rounds first. ``out``: a
    folder (``out/bench.json``) or a ``.json`` path.
    """
    from rich.console import Console

    console = console or Console()
    path = check_out(out, BENCH_FILE)
    torch_device = resolve_device(device, dtype)
    preset = QUICK if quick else FULL
    batch_sizes = _positive_ints(batch_sizes or preset["batch_sizes"], "batch size", 1)
    if repeats is not None and repeats < 1:
        raise DynbertError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise DynbertError(f"warmup must be 0 or more, got {warmup}")
    if threads is not None and threads < 1:
        raise DynbertError(f"threads must be at least 1, got {threads}")
    if schedules is None:
        schedules = DEFAULT_SCHEDULES + (("learned",) if run is not None else ())
    schedules = list(dict.fromkeys(schedules))
    unknown = [name for name in schedules if name not in SCHEDULES]
    if unknown:
        raise DynbertError(f"unknown schedule(s) {unknown}; expected names from {SCHEDULES}")
    if "learned" in schedules and run is None:
        raise DynbertError("schedule 'learned' needs a trained run: it benches the run's own method")
    if run is not None and (model is not None or model_config is not None):
        raise DynbertError("give either a run or a model (and its sizes), not both: a run brings its own model")
    config = None if run is not None else _random_model_config(model, model_config, quick)
    source = str(model or DEFAULT_FAMILY) if run is None else "run" if isinstance(run, GatedModel) else str(run)
    if run is not None and not isinstance(run, GatedModel):
        from dynbert.predictor import load

        run = load(Path(run), "cpu").gated
    if run is not None and not run.pruned_layers:
        raise DynbertError("the run prunes no layer (a method=none run): there is nothing to prune; "
                           "bench a pruned run, or no run for random weights")
    if not seq_lens and run is not None:  # a trained method covers its own max length only
        seq_lens = [length for length in preset["seq_lens"] if length <= run.max_length] or [run.max_length]
    seq_lens = _positive_ints(seq_lens or preset["seq_lens"], "sequence length", 2)
    if run is not None and max(seq_lens) > run.max_length:
        raise DynbertError(f"sequence length {max(seq_lens)} exceeds the run's max_length {run.max_length}")

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        plain, pruned = _models(config, run, seq_lens, torch_device, DTYPES[dtype])
        result = _bench(plain, pruned, run, quick=quick, preset=preset, batch_sizes=batch_sizes, seq_lens=seq_lens,
                        schedules=schedules, device=torch_device, dtype=dtype, repeats=repeats, warmup=warmup,
                        source=source, console=console)
    finally:
        torch.set_num_threads(previous_threads)

    atomic_write_json(path, result)
    _print_table(console, result)
    return result


# ---------------------------------------------------------------------------------------------
# Models


def _random_model_config(model: str | os.PathLike | None, sizes: dict | None, quick: bool):
    """The config of the model to time: a family's defaults or a folder's config.json, resized."""
    from transformers import AutoConfig

    name = str(model or DEFAULT_FAMILY)
    families = supported_model_types()
    if name in families:
        config = AutoConfig.for_model(name, num_labels=2)
        sizes = sizes if sizes is not None else (QUICK_SIZES if quick else {})
    else:
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise DynbertError(f"--model {name} is neither a model family ({', '.join(families)}) nor a folder")
        if not (folder / "config.json").is_file():
            raise DynbertError(f"--model {name} holds no config.json: pass a folder saved with save_pretrained")
        try:
            config = AutoConfig.from_pretrained(folder)
        except Exception as error:  # noqa: BLE001 - a broken or foreign config: one sentence
            raise DynbertError(f"--model {name}: its config.json does not load ({error.__class__.__name__})") from error
        sizes = sizes or {}
    if adapter_class(config.model_type) is None:
        raise DynbertError(f"--model {name} is a '{config.model_type}' model; dynbert bench times "
                           f"{', '.join(families)} models")
    for key, value in sizes.items():
        # DistilBERT maps BERT's hidden_size, num_hidden_layers and num_attention_heads itself, but
        # calls the feed-forward width hidden_dim.
        if key == "intermediate_size" and not hasattr(config, key) and hasattr(config, "hidden_dim"):
            key = "hidden_dim"
        if not hasattr(config, key):
            raise DynbertError(f"{key} is not a size of a '{config.model_type}' config")
        setattr(config, key, value)
    return config


def _models(config, run: GatedModel | None, seq_lens: list[int], device: torch.device,
            dtype: torch.dtype) -> tuple[nn.Module, Callable]:
    """(the plain classifier, ``pruned(schedule, score, length) -> GatedModel``), on ``device`` in ``dtype``.

    Every pruned model wraps one copy of the weights; the plain one is a second copy on transformers'
    own sdpa attention. A run's model is copied, never changed.
    """
    if run is None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            hf_model = adapter_class(config.model_type).model_class(config)
    else:
        hf_model = copy.deepcopy(run.model)
    plain = copy.deepcopy(hf_model)
    plain.config._attn_implementation = adapter_for(plain).plain_attention
    plain.to(device=device, dtype=dtype).eval()
    hf_model.to(device=device, dtype=dtype).eval()
    encoder = adapter_for(hf_model)
    num_layers = encoder.dims.num_layers
    too_long = [length for length in seq_lens if length > encoder.max_positions]
    if too_long:
        raise DynbertError(f"sequence length(s) {too_long} exceed the model's {encoder.max_positions} positions")
    layers = run.pruned_layers if run is not None else list(range(num_layers))
    max_length = run.max_length if run is not None else max(seq_lens)

    def pruned(schedule: str, score: str, length: int) -> GatedModel:
        if schedule == "learned":
            method, mask_attention = copy.deepcopy(run.method), run.mask_attention
        else:
            method = schedule_method(schedule, layers, num_layers, max_length, score)
            mask_attention = True
        return GatedModel(hf_model, method.to(device=device, dtype=dtype), mask_attention, encoder).eval()

    return plain, pruned


def schedule_method(schedule: str, layers: list[int], num_layers: int, max_length: int, score: str) -> TokenPruner:
    """The fixed schedule ``schedule`` (``methods/schedule.py``) as a method, ranking by ``score``: the
    kernel still scores and ranks, the schedule fixes how many stay."""
    return registered("schedule")(layers, max_length, num_layers, shape=schedule, score=score)


# ---------------------------------------------------------------------------------------------
# Counting and timing


def _bench(plain: nn.Module, pruned: Callable, run: GatedModel | None, *, quick, preset, batch_sizes, seq_lens,
           schedules, device, dtype, repeats, warmup, source, console) -> dict:
    load_start, started = os.getloadavg()[0], time.perf_counter()
    progress(console, started, "counting FLOPs (batch of one, every configuration)")
    model_score = run.method.score if run is not None else SCORES[0]
    pairs = [(schedule, model_score) for schedule in schedules]
    pairs += [(schedule, other) for schedule in schedules if schedule in COMPARE_SCORE_ON
              for other in SCORES if other != model_score]
    models = {(schedule, score, length): pruned(schedule, score, length)
              for schedule, score in pairs for length in set(seq_lens)}
    any_model = next(iter(models.values()))
    vocab_size, num_layers = any_model.model.config.vocab_size, any_model.num_layers

    # FLOPs and kept tokens depend on the length only (random tokens, no padding): count once.
    counted = {}
    for length in seq_lens:
        ids, mask = _inputs(1, length, vocab_size, device)
        plain_flops = count_matmul_flops(plain, input_ids=ids, attention_mask=mask)
        counted[PLAIN, PLAIN, None, length] = dict(kept_fraction=1.0, kept_per_layer=[length] * num_layers,
                                                   flops_ratio_analytic=1.0, flops_ratio_measured=1.0)
        for schedule, score in pairs:
            gated = models[schedule, score, length]
            for mode in MODES:
                outputs = []  # one forward gives both the FLOPs and the kept counts
                measured = count_matmul_flops(lambda: outputs.append(gated(ids, mask, hard=mode == "gather")))
                kept = outputs[0].kept
                counted[schedule, mode, score, length] = dict(
                    kept_fraction=kept.double().mean().item() / length, kept_per_layer=kept[0].tolist(),
                    flops_ratio_analytic=flops_ratio(*gated.flops(outputs[0])),
                    flops_ratio_measured=measured / plain_flops)

    rows, rounds_used = [], {}
    for batch in batch_sizes:
        for length in seq_lens:
            configs = [_Config(PLAIN, PLAIN, None, plain)]
            configs += [_Config(schedule, mode, score, models[schedule, score, length])
                        for schedule, score in pairs for mode in MODES]
            ids, mask = _inputs(batch, length, vocab_size, device)
            calls = [_forward_call(c, ids, mask) for c in configs]
            progress(console, started, f"timing batch {batch}, length {length}: {len(configs)} configurations")
            times, rounds = time_round_robin(calls, device=device, warmup=warmup,
                                              repeats=repeats or (QUICK_ROUNDS if quick else None),
                                              budget_s=preset["budget_s"])
            rounds_used[f"{batch}x{length}"] = rounds
            seconds = [statistics.median(t) for t in times]
            plain_seconds = seconds[0]
            for c, secs, each in zip(configs, seconds, times):
                facts = counted[c.schedule, c.mode, c.score, length]
                speedup = plain_seconds / secs
                rows.append(dict(schedule=c.schedule, mode=c.mode, score=c.score, batch_size=batch, seq_len=length,
                                 **facts, seconds_median=secs, seconds_min=min(each), speedup=speedup,
                                 efficiency=speedup * facts["flops_ratio_analytic"]))

    dims = any_model.encoder.dims
    return dict(
        machine=machine(device), torch=torch.__version__, threads=torch.get_num_threads(), dtype=dtype, quick=quick,
        model=dict(source=source, model_type=any_model.model.config.model_type, hidden_size=dims.hidden,
                   num_hidden_layers=dims.num_layers, intermediate_size=dims.intermediate,
                   num_attention_heads=any_model.encoder.num_heads, pruned_layers=list(any_model.pruned_layers),
                   score=model_score, method=run.method.name if run is not None else None),
        rounds=rounds_used, warmup=warmup, load_average=dict(start=load_start, end=os.getloadavg()[0]),
        rows=rows, wall_seconds=time.perf_counter() - started,
    )


def _inputs(batch: int, length: int, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids, every one real (no padding); a fixed seed so every run sees the same."""
    generator = torch.Generator().manual_seed(batch * 100_003 + length)
    low = 1000 if vocab_size > 2000 else 1  # above the special tokens of the usual vocabularies
    ids = torch.randint(low, vocab_size, (batch, length), generator=generator).to(device)
    return ids, torch.ones_like(ids)


def _forward_call(config: _Config, ids, mask) -> tuple[tuple, Callable]:
    """(warm-up key, forward). Configurations with the same key run the same kernels on the same
    shapes (masking runs at full length whatever the schedule), so one warm-up forward serves them all.
    """
    if config.mode == PLAIN:
        return (PLAIN,), (lambda: config.model(input_ids=ids, attention_mask=mask))
    hard = config.mode == "gather"
    key = (config.mode, config.score) + ((config.schedule,) if hard else ())
    return key, (lambda: config.model(ids, mask, hard=hard))


def _positive_ints(values: Sequence[int], what: str, least: int) -> list[int]:
    values = [int(value) for value in values]
    if not values or min(values) < least:
        raise DynbertError(f"every {what} must be at least {least}, got {values}")
    return values


# ---------------------------------------------------------------------------------------------
# Output


def _print_table(console, result: dict) -> None:
    from rich import box
    from rich.table import Table

    model = result["model"]
    table = Table(title=f"dynbert bench: {model['model_type']} {model['num_hidden_layers']} layers x "
                        f"{model['hidden_size']}, {result['dtype']}, {result['machine']['device_name'] or 'cpu'}, "
                        f"{result['threads']} threads",
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
    print_table(console, table)


_SHORT_SCORE = {"attention_received": "recv", "cls_attention": "cls", None: ""}
