"""What the three benchmarks share: where a result goes, the device to time on, the clock, the machine.

`dynbert bench` (``bench.py``: pruned inference against the plain model), `dynbert bench --train`
(``train_bench.py``: the training step) and `dynbert bench --run --inputs dev` (``serve_bench.py``: a
run served by each runtime) stand side by side on the engine; none imports another.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path

import torch

from .errors import DynbertError, check_writable_folder

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_ROUNDS, MAX_ROUNDS = 3, 15
"""Timed rounds when a bench fits them to a time budget: as many as fit, within these bounds."""


def result_path(out: str | os.PathLike, file_name: str) -> Path:
    """Where a bench writes: ``out`` itself if it ends in ``.json``, else ``out/file_name``."""
    out = Path(out)
    return out if out.suffix == ".json" else out / file_name


def check_out(out: str | os.PathLike, file_name: str) -> Path:
    """The result's path, or one sentence on why it cannot be written there."""
    path = result_path(out, file_name)
    if path.is_dir():
        raise DynbertError(f"--out {out} is a folder named like a JSON file: pass another path")
    check_writable_folder(path.parent, "--out")
    return path


def resolve_device(device: str, dtype: str = "fp32") -> torch.device:
    """The device to time on (``auto``: CUDA when there is one), or one sentence on why not."""
    if device not in DEVICES:
        raise DynbertError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if dtype not in DTYPES:
        raise DynbertError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise DynbertError("--device cuda but no CUDA GPU is visible: pass --device auto or cpu")
    resolved = torch.device("cuda" if device == "cuda" or (device == "auto" and has_cuda) else "cpu")
    if dtype == "fp16" and resolved.type != "cuda":
        raise DynbertError("--dtype fp16 needs a CUDA GPU (CPUs have no fast fp16 products): pass --dtype "
                           "bf16 or fp32 on this machine")
    if dtype == "bf16" and resolved.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DynbertError("--dtype bf16 needs a GPU with bfloat16 support: pass --dtype fp16 or fp32")
    return resolved


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so a clock read after it counts that work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress(console, started: float, message: str) -> None:
    """A dim line: seconds since ``started``, then what the bench does now."""
    console.print(f"[dim]{time.perf_counter() - started:6.0f} s  {message}[/dim]")


def time_round_robin(calls, *, device, warmup, repeats, budget_s) -> tuple[list[list[float]], int]:
    """Seconds of each call's forward in every timed round (one of each per round, after ``warmup``).

    Warm-up rounds run one call per warm-up key. ``repeats=None``: as many rounds as fit
    ``budget_s`` at the warm-up's pace (``MIN_ROUNDS`` to ``MAX_ROUNDS``).
    """
    def run(index):
        _, forward = calls[index]
        with torch.inference_mode():
            synchronize(device)
            begin = time.perf_counter()
            forward()
            synchronize(device)
            return time.perf_counter() - begin

    first_of_key = {}
    for index, (key, _) in enumerate(calls):
        first_of_key.setdefault(key, index)
    pace = {}
    for _ in range(max(warmup, 1 if repeats is None else 0)):
        pace = {key: run(index) for key, index in first_of_key.items()}
    if repeats is None:
        repeats = min(MAX_ROUNDS, max(MIN_ROUNDS, int(budget_s / sum(pace[key] for key, _ in calls))))
    times = [[] for _ in calls]
    for _ in range(repeats):
        for index in range(len(calls)):
            times[index].append(run(index))
    return times, repeats


def machine(device: torch.device) -> dict:
    """What the figures were measured on: the CPU (and its bf16 instructions), the GPU if one timed."""
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
                bf16_instructions=sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
                device=device.type,
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model)
