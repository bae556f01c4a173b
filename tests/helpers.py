"""What the CLI tests share: the small model, running `dynbert` in-process or as a process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from dynbert.cli import app

# Small enough that a run takes about a second on one CPU thread.
SMALL_MODEL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
               "model.vocab_size=300"]
FAST = ["debug=fast", *SMALL_MODEL]
SYNTHETIC = ["task.num_train=64", "task.num_eval=32"]
# Keys every metrics.json holds (README, "The run folder").
CONTRACT_KEYS = {"task", "lambda", "seed", "metric", "score", "score_soft", "metrics", "flops_per_example",
                 "baseline_flops_per_example", "flops_ratio", "kept_per_layer", "train_seconds", "version"}
# Keys that may differ between two runs of the same command.
RUN_SPECIFIC = {"train_seconds", "run_dir"}


def invoke(*args: str, stdin: str | None = None):
    """`dynbert ARGS` in this process (Typer's runner), reading ``stdin``: exit_code, stdout, stderr."""
    return CliRunner().invoke(app, [str(arg) for arg in args], input=stdin)


def dynbert_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dynbert.cli", *map(str, args)]


def run_dynbert(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`dynbert ARGS` as its own process (what a sweep or a kill needs). The timeout only guards
    against a hang: a 4-run sweep took over 120 s beside two training runs."""
    return subprocess.run(dynbert_command(*args), capture_output=True, text=True, timeout=timeout)


def train_stopping_at(step: int, action: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`dynbert train ARGS` in a child process that stops itself right after saving the checkpoint of
    ``step``: ``action`` "SIGINT" or "SIGTERM" sends that signal to itself (the real handlers run),
    "KILL" ends it with os._exit (no cleanup at all, as SIGKILL). Deterministic: the stop lands at
    that step whatever the machine's load, which a signal from outside cannot promise.
    """
    stop = "os._exit(137)" if action == "KILL" else f"os.kill(os.getpid(), signal.{action})"
    code = (
        "import os, signal, sys\n"
        # Ctrl-C as at a terminal: a job that a script started in the background (`cmd &`, nohup)
        # inherits SIGINT ignored, and dynbert rightly leaves an ignored SIGINT ignored.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import dynbert.train as train\n"
        "save, stopped = train.save_checkpoint, []\n"
        "def save_then_stop(path, state):\n"
        "    save(path, state)\n"
        f"    if state['step'] == {step} and not stopped:\n"
        "        stopped.append(True)\n"
        f"        {stop}\n"
        "train.save_checkpoint = save_then_stop\n"
        "from dynbert.cli import app\n"
        f"app(['train', *{[str(arg) for arg in args]!r}], prog_name='dynbert')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def read_json(path: Path):
    """Strict JSON: NaN or Infinity in a metrics file is an error, as it is for other readers."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


def comparable(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key not in RUN_SPECIFIC}


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path, with its bytes."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def gated_bert(model, max_length: int, layers=None, mask_attention: bool = True, **gate_options):
    """A BERT classifier pruned by the paper's gates (every layer unless ``layers``)."""
    from dynbert.core import GatedModel
    from dynbert.methods.gates import Gates

    num_layers = model.config.num_hidden_layers
    layers = list(range(num_layers)) if layers is None else sorted(set(layers))
    return GatedModel(model, Gates(layers, max_length, num_layers, **gate_options), mask_attention=mask_attention)
