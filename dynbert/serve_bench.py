"""`dynbert bench --run RUN --inputs dev --runtime torch,onnxruntime`: the run as it is served.

``bench.py`` times random full-length token ids, which tells how time follows a keep schedule but
not what a length-dependent method (PoWER-BERT's fixed k, LTP's thresholds) does at the lengths it
was scored at. This bench feeds the run's own dev texts (its dev split as its config loads it,
tokenized as its evaluation did, real lengths), in dataset order, cut into batches of each batch
size and padded to each batch's longest, as a server would get them. On the CPU it times:

- ``dense`` ``torch``: the run's fine-tuned classifier, un-pruned (transformers' forward, sdpa);
- ``dense`` ``onnxruntime``: the same weights, un-pruned, exported as `dynbert export --format onnx`
  exports (``export.exported_classifier(prune=False)``);
- ``pruned`` ``torch``: dynbert's hard mode (what `dynbert predict` runs);
- ``pruned`` ``onnxruntime``: `dynbert export --format onnx`'s model.onnx;
- ``pruned int8`` ``onnxruntime``: the same, dynamically quantized (``--quantize int8``).

One call is a pass over all the examples; calls run round-robin (one pass of each model per
round, ``measure.time_round_robin``), the median over rounds is reported. Per row: seconds per
pass, latency per batch, examples/s, the FLOPs ratio of what it ran (from its own kept counts),
``speedup`` over the dense model of the same runtime and ``efficiency`` (speed-up x FLOPs ratio; 1.0:
time falls as the FLOPs do), its score on these examples and its agreement with dynbert's hard
mode. ``targets``: pruned ONNX Runtime against dense ONNX Runtime at batch 32 (efficiency >= 0.9)
and batch 1 (>= 0.7).
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .measure import check_out, machine, progress, time_round_robin
from .console import print_table
from .core import flops_per_example
from .encoders import adapter_for
from .errors import DynbertError, atomic_write_json
from .data import collate
from .export import (ONNX_FILE, ONNX_INT8_FILE, OnnxClassifier, agreement, dev_split, dynbert_runner,
                     exported_classifier, predictions, quantize_int8, require_onnx, run_batches, sorted_batches,
                     write_onnx)
from .tasks import compute_metrics

SERVE_BENCH_FILE = "serve_bench.json"
RUNTIMES = ("torch", "onnxruntime")
INPUTS = ("random", "dev")
"""What `dynbert bench --inputs` takes: random full-length ids (``bench.py``) or the run's dev texts (here)."""
BATCH_SIZES = (1, 32)
QUICK_EXAMPLES, QUICK_ROUNDS, BUDGET_S = 64, 3, 25.0
"""``quick``: the first 64 dev examples, 3 rounds. Otherwise every dev example and as many rounds as
fit ``BUDGET_S`` seconds per batch size (``measure.MIN_ROUNDS`` to ``measure.MAX_ROUNDS``)."""
TARGETS = {32: 0.9, 1: 0.7}
"""Batch size: the efficiency pruned ONNX Runtime should reach against dense ONNX Runtime."""
DENSE, PRUNED, PRUNED_INT8 = "dense", "pruned", "pruned int8"


def parse_runtimes(text: str | None) -> tuple[str, ...]:
    """``--runtime`` (a comma list) as names from ``RUNTIMES``, or one sentence on what is wrong."""
    names = tuple(dict.fromkeys(part.strip() for part in (text or "torch").split(",") if part.strip()))
    unknown = [name for name in names if name not in RUNTIMES]
    if unknown or not names:
        raise DynbertError(f"--runtime {text} names {unknown or 'nothing'}; expected a comma list of "
                           f"{', '.join(RUNTIMES)}")
    return names


def run_serve_bench(run: str | os.PathLike, *, runtimes: tuple[str, ...] = ("torch",), batch_sizes=None,
                    quick: bool = False, threads: int | None = None, repeats: int | None = None, warmup: int = 1,
                    out: str | os.PathLike, console=None) -> dict:
    """Time the run on its dev texts in each of ``runtimes`` (``RUNTIMES``); write and return ``serve_bench.json``."""
    from rich.console import Console

    from .predictor import finished_run, load

    console = console or Console()
    path = check_out(out, SERVE_BENCH_FILE)
    batch_sizes = [int(size) for size in (batch_sizes or BATCH_SIZES)]
    if min(batch_sizes) < 1:
        raise DynbertError(f"every batch size must be at least 1, got {batch_sizes}")
    if threads is not None and threads < 1:
        raise DynbertError(f"threads must be at least 1, got {threads}")
    if repeats is not None and repeats < 1:
        raise DynbertError(f"repeats must be at least 1, got {repeats}")
    run = Path(run).expanduser()
    cfg, spec = finished_run(run)
    if "onnxruntime" in runtimes:
        require_onnx("--runtime onnxruntime")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        predictor = load(run, "cpu")
        data = dev_split(cfg, spec, predictor.tokenizer)
        if quick:
            data = data.head(QUICK_EXAMPLES)
        with tempfile.TemporaryDirectory(prefix="dynbert-serve-") as folder:
            started = time.perf_counter()
            runners = _runners(predictor, runtimes, Path(folder), console, started)
            result = _bench(runners, predictor, data, spec, batch_sizes=batch_sizes, repeats=repeats or (
                QUICK_ROUNDS if quick else None), warmup=warmup, console=console, started=started)
    finally:
        torch.set_num_threads(previous_threads)
    result.update(run=str(run), quick=quick, runtimes=list(runtimes), inputs=dict(
        split=spec.eval_splits[0], examples=len(data), mean_tokens=statistics.mean(data.lengths),
        max_tokens=max(data.lengths), max_length=cfg.task.max_length, order="dataset"))
    atomic_write_json(path, result)
    print_serve_table(console, result)
    return result


def _runners(predictor, runtimes, folder: Path, console, started: float) -> dict:
    """{(model, runtime): (input_ids, attention_mask, token_type_ids) -> (logits, kept)}, in timing order."""
    gated = predictor.gated
    runners = {}
    if "torch" in runtimes:
        plain = copy.deepcopy(gated.model)
        plain.config._attn_implementation = adapter_for(plain).plain_attention
        plain.eval()
        types = adapter_for(plain).has_token_types
        num_layers = gated.num_layers

        @torch.inference_mode()
        def dense_torch(input_ids, attention_mask, token_type_ids=None):
            logits = plain(input_ids=input_ids, attention_mask=attention_mask,
                           **({"token_type_ids": token_type_ids} if types else {})).logits
            return logits, attention_mask.sum(dim=1, keepdim=True).expand(-1, num_layers)

        runners[DENSE, "torch"] = dense_torch
        runners[PRUNED, "torch"] = dynbert_runner(gated)
    if "onnxruntime" in runtimes:
        threads = torch.get_num_threads()  # the same cores for both runtimes
        for name, prune in ((DENSE, False), (PRUNED, True)):
            progress(console, started, f"exporting the {name} model to ONNX")
            onnx_path = folder / f"{name}-{ONNX_FILE}"
            write_onnx(exported_classifier(gated, prune=prune), predictor.tokenizer, onnx_path)
            runners[name, "onnxruntime"] = OnnxClassifier(onnx_path, threads)
        progress(console, started, "quantizing the pruned ONNX model to int8")
        quantize_int8(folder / f"{PRUNED}-{ONNX_FILE}", folder / ONNX_INT8_FILE)
        runners[PRUNED_INT8, "onnxruntime"] = OnnxClassifier(folder / ONNX_INT8_FILE, threads)
    return runners


def _bench(runners: dict, predictor, data, spec, *, batch_sizes, repeats, warmup, console, started) -> dict:
    load_start = os.getloadavg()[0]
    gated = predictor.gated
    dims = gated.encoder.dims
    num_tokens = torch.tensor(data.lengths)
    baseline = flops_per_example(num_tokens, num_tokens[:, None].expand(-1, dims.num_layers), dims).sum().item()
    labels = data.labels.tolist()
    # What every row is compared with: dynbert's hard mode, in evaluation's batches.
    reference = predictions(spec, run_batches(dynbert_runner(gated), data,
                                              sorted_batches(data, predictor.batch_size))[0])
    rows, rounds_used = [], {}
    for batch_size in batch_sizes:
        batches = [collate(data, list(range(start, min(start + batch_size, len(data)))))
                   for start in range(0, len(data), batch_size)]
        outputs = {}

        def one_pass(key, runner):
            def forward():
                results = [runner(b.input_ids, b.attention_mask, b.token_type_ids) for b in batches]
                outputs[key] = (torch.cat([logits.float() for logits, _ in results]),
                                torch.cat([kept for _, kept in results]))
            return key, forward

        calls = [one_pass(key, runner) for key, runner in runners.items()]
        progress(console, started, f"timing batch {batch_size}: {len(batches)} batches, {len(calls)} models")
        times, rounds = time_round_robin(calls, device=torch.device("cpu"), warmup=warmup, repeats=repeats,
                                          budget_s=BUDGET_S)
        rounds_used[str(batch_size)] = rounds
        seconds = {key: statistics.median(each) for key, each in zip(runners, times)}
        for (name, runtime), each in zip(runners, times):
            logits, kept = outputs[name, runtime]
            ratio = flops_per_example(num_tokens, kept, dims).sum().item() / baseline
            speedup = seconds[DENSE, runtime] / seconds[name, runtime]
            predicted = predictions(spec, logits)
            rows.append(dict(model=name, runtime=runtime, batch_size=batch_size, batches=len(batches),
                             seconds_median=seconds[name, runtime], seconds_min=min(each),
                             latency_ms_median=1000 * seconds[name, runtime] / len(batches),
                             examples_per_second=len(data) / seconds[name, runtime], flops_ratio=ratio,
                             speedup=speedup, efficiency=speedup * ratio,
                             score=compute_metrics(spec, predicted.tolist(), labels)[spec.main_metric],
                             agreement=agreement(spec, predicted, reference)))
    dims_info = dict(model_type=gated.model.config.model_type, hidden_size=dims.hidden,
                     num_hidden_layers=dims.num_layers, method=gated.method.name,
                     pruned_layers=list(gated.pruned_layers))
    return dict(machine=machine(torch.device("cpu")), torch=torch.__version__, onnxruntime=_ort_version(),
                threads=torch.get_num_threads(), model=dims_info, metric=spec.main_metric, rounds=rounds_used,
                warmup=warmup, load_average=dict(start=load_start, end=os.getloadavg()[0]), rows=rows,
                targets=_targets(rows), wall_seconds=time.perf_counter() - started)


def _ort_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def _targets(rows: list[dict]) -> list[dict]:
    """Pruned against dense ONNX Runtime at the batch sizes with a target: speed-up, FLOPs reduction,
    their ratio (efficiency) and whether it reaches ``TARGETS``."""
    found = []
    for row in rows:
        if row["model"] == PRUNED and row["runtime"] == "onnxruntime" and row["batch_size"] in TARGETS:
            wanted = TARGETS[row["batch_size"]]
            found.append(dict(batch_size=row["batch_size"], speedup=row["speedup"],
                              flops_reduction=1 / row["flops_ratio"], efficiency=row["efficiency"],
                              target=wanted, met=row["efficiency"] >= wanted))
    return found


def print_serve_table(console, result: dict) -> None:
    from rich import box
    from rich.table import Table

    model, inputs = result["model"], result["inputs"]
    targets = "; ".join(f"batch {t['batch_size']}: {t['speedup']:.2f}x for {t['flops_reduction']:.2f}x fewer FLOPs, "
                        f"efficiency {t['efficiency']:.2f} (target {t['target']}: {'met' if t['met'] else 'not met'})"
                        for t in result["targets"])
    table = Table(title=f"dynbert bench, served: {model['method']} {model['model_type']} {model['num_hidden_layers']} "
                        f"layers x {model['hidden_size']}, {inputs['examples']} {inputs['split']} texts "
                        f"(mean {inputs['mean_tokens']:.0f} tokens), {result['machine']['cpu_model'] or 'cpu'}, "
                        f"{result['threads']} threads",
                  caption="speed-up: over the dense model of the same runtime; eff.: speed-up x FLOPs; agree: "
                          "predictions equal to dynbert's hard mode" + (f"\npruned vs dense ONNX Runtime: {targets}"
                                                                         if targets else ""),
                  box=box.SIMPLE_HEAD)
    for column in ("b", "model", "runtime", "FLOPs", "ms/batch", "ex/s", "speed-up", "eff.", result["metric"], "agree"):
        table.add_column(column, justify="left" if column in ("model", "runtime") else "right")
    previous = None
    for row in result["rows"]:
        if previous is not None and row["batch_size"] != previous:
            table.add_section()
        previous = row["batch_size"]
        table.add_row(str(row["batch_size"]), row["model"], row["runtime"], f"{row['flops_ratio']:.3f}",
                      f"{row['latency_ms_median']:.2f}", f"{row['examples_per_second']:.0f}",
                      f"{row['speedup']:.2f}x", f"{row['efficiency']:.2f}", f"{row['score']:.4f}",
                      f"{100 * row['agreement']:.1f}%")
    print_table(console, table)
