"""A finished run as a predictor: what `dynbert predict`, `dynbert inspect` and ``dynbert.load`` use.

The run's model runs as its evaluation ran it in hard mode: the learned decisions exactly 0/1,
dropped tokens gathered away, the same tokenization (cut to the run's ``task.max_length``), the
same length-sorted batches (``evaluate.predict``, at the run's ``train.eval_batch_size``) and the
same FLOPs count. Predicting a run's dev file therefore gives the predictions and the FLOPs ratio
that its evaluation recorded in metrics.json.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from .core import GatedModel
from .data import Encoded, collate
from .errors import DynbertError, shorten, utf8_problem
from .evaluate import predict as predict_sorted_batches, refuse_non_finite
from .inspection import Inspection
from .loop import precision_autocast
from .modeling import load_model
from .rundir import METRICS_FILE, MODEL_DIR, load_run_config, read_metrics
from .tasks import TaskSpec, get_task

OUTPUT_FORMATS = (".tsv", ".jsonl")


def load(run_dir: str | Path, device: str | None = None) -> Predictor:
    """The finished run in ``run_dir``, ready to predict as its evaluation did: the one run loader
    (`dynbert predict`, `inspect`, `export`, `bench --run`, ``dynbert.load``, ``train.load_run``).

    ``device`` defaults to CUDA if visible, else CPU. The run's ``train.precision`` is honoured: a bf16
    or fp16 run predicts under the autocast its evaluation ran under (a run folder from before the
    key trained in fp32).
    """
    run_dir = Path(run_dir).expanduser()
    cfg, spec = finished_run(run_dir)
    gated, tokenizer = load_model(run_dir / MODEL_DIR, cfg.method, cfg.task.max_length)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = precision_autocast(cfg.train.get("precision", "fp32"), device)
    return Predictor(gated.to(device).eval(), tokenizer, spec, cfg.train.eval_batch_size, autocast)


def finished_run(run_dir: Path) -> tuple[DictConfig, TaskSpec]:
    """The config and task of a run that finished training, or one sentence on why it is not one."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        what = "is a file" if run_dir.exists() else "does not exist"
        raise DynbertError(f"run folder {run_dir} {what}: pass a folder that `dynbert train` wrote")
    cfg = load_run_config(run_dir)
    metrics, why = read_metrics(run_dir)
    if why is not None:
        raise DynbertError(f"{run_dir / METRICS_FILE} is unusable ({why}): train the run again")
    if metrics is None:
        raise DynbertError(f"{run_dir} is not a finished run (it has no {METRICS_FILE}: training is still going, "
                           "was stopped or failed): finish it with the same `dynbert train` command first")
    return cfg, get_task(cfg.task.name)


class Predictor:
    """A trained run's pruned model and tokenizer: ``predict`` many texts, ``inspect`` one."""

    def __init__(self, gated: GatedModel, tokenizer, spec: TaskSpec, batch_size: int,
                 autocast=contextlib.nullcontext):
        self.gated = gated
        self.tokenizer = tokenizer
        self.spec = spec
        self.batch_size = batch_size
        """The run's evaluation batch size: the same batches give evaluation's numbers exactly."""
        self.autocast = autocast
        """The run's precision (``loop.precision_autocast``): every forward runs under it, as evaluation's did."""

    @property
    def max_length(self) -> int:
        """Tokens per input the run was trained for (task.max_length); longer inputs are truncated."""
        return self.gated.max_length

    @property
    def takes_pairs(self) -> bool:
        return self.spec.text_columns[1] is not None

    def predict(self, texts, batch_size: int | None = None) -> list[dict]:
        """One dict per text (a str, or a (text_a, text_b) pair for pair tasks), in order.

        Classification: ``label``, ``score`` (its probability) and ``probabilities`` by label name;
        STS-B: ``score``, the predicted similarity. Always: ``num_tokens``, ``kept_per_layer``
        (tokens present after each layer), ``flops`` and ``baseline_flops`` (the same input
        un-pruned), ``flops_ratio``, and ``truncated`` (cut to ``max_length``).
        """
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise DynbertError(f"batch_size={batch_size!r} is not valid: pass an integer >= 1, or None for the "
                               f"run's own ({self.batch_size})")
        pairs = self._pairs(texts)
        if not pairs:
            return []
        encoded, truncated = self.encode(pairs)
        result = predict_sorted_batches(self.gated, encoded, batch_size or self.batch_size, hard=True, spec=self.spec,
                                        autocast=self.autocast)
        return [self._record(result["logits"][i], result["kept_tokens"][i], len(encoded.input_ids[i]),
                             result["flops"][i], result["baseline_flops"][i], truncated[i])
                for i in range(len(pairs))]

    @torch.no_grad()
    def inspect(self, text_a: str, text_b: str | None = None) -> Inspection:
        """What the pruned model does to one input, layer by layer, from its real hard forward pass."""
        if not text_a.strip() and not (text_b or "").strip():
            raise DynbertError("the text to inspect is empty: pass the sentence to look at")
        if self.takes_pairs and text_b is None:
            raise DynbertError(f"{self.spec.name} compares two texts: pass the second one too")
        if not self.takes_pairs and text_b is not None:
            raise DynbertError(f"{self.spec.name} takes one text, not two: drop the second")
        encoded, truncated = self.encode([(text_a, text_b)])
        batch = collate(encoded, [0]).to(next(self.gated.parameters()).device)
        with self.autocast():
            out = self.gated(batch.input_ids, batch.attention_mask, batch.token_type_ids, hard=True, return_scores=True)
        refuse_non_finite(self.gated, out.logits)
        flops, baseline = self.gated.flops(out)
        ids = encoded.input_ids[0]
        prediction = self._record(out.logits[0].float().cpu(), out.kept[0].cpu(), len(ids), flops[0], baseline[0],
                                  truncated[0])
        scores = [[None if math.isnan(value) else value for value in layer] for layer in out.scores[0].cpu().tolist()]
        return Inspection(task=self.spec.name, text_a=text_a, text_b=text_b,
                          tokens=self.tokenizer.convert_ids_to_tokens(ids), present=out.present[0].cpu().tolist(),
                          scores=scores, pruned_layers=list(self.gated.pruned_layers),
                          score_name=self.gated.method.score, prediction=prediction)

    def encode(self, pairs: list[tuple[str, str | None]]) -> tuple[Encoded, list[bool]]:
        """Tokenize as training did (``data.encode``), cut to ``max_length``; and which inputs were cut."""
        texts_a = [a for a, _ in pairs]
        texts_b = [b for _, b in pairs] if self.takes_pairs else None
        batch = self.tokenizer(texts_a, texts_b, truncation=True, max_length=self.max_length)
        ids = batch["input_ids"]
        # Only an input that fills max_length can have been cut: tokenize those again, uncut, to know.
        full = [i for i, row in enumerate(ids) if len(row) == self.max_length]
        truncated = [False] * len(pairs)
        if full:
            uncut = self.tokenizer([texts_a[i] for i in full], [texts_b[i] for i in full] if texts_b else None,
                                   verbose=False)["input_ids"]
            for i, row in zip(full, uncut):
                truncated[i] = len(row) > self.max_length
        # Nothing here is labelled; collate carries a label per example, which predict never reads.
        encoded = Encoded(input_ids=ids, token_type_ids=batch.get("token_type_ids"),
                          labels=torch.zeros(len(ids)), cue_mask=None, pad_id=self.tokenizer.pad_token_id)
        return encoded, truncated

    def _pairs(self, texts) -> list[tuple[str, str | None]]:
        """``texts`` checked against the task: strings for one-text tasks, pairs for pair tasks."""
        if isinstance(texts, str):
            raise DynbertError("predict takes a list of texts, not one string: pass [text]")
        if not isinstance(texts, Iterable):  # None, a number: Python's own error would name neither
            raise DynbertError(f"predict takes a list of texts, not {type(texts).__name__}: pass [text, ...]")
        texts = list(texts)
        if self.takes_pairs:
            if not all(isinstance(t, (tuple, list)) and len(t) == 2 and all(isinstance(s, str) for s in t)
                       for t in texts):
                raise DynbertError(f"{self.spec.name} compares two texts: pass a list of (text_a, text_b) pairs")
            return [(a, b) for a, b in texts]
        if not all(isinstance(t, str) for t in texts):
            raise DynbertError(f"{self.spec.name} takes one text per example: pass a list of strings")
        return [(t, None) for t in texts]

    def _record(self, logits: torch.Tensor, kept: torch.Tensor, num_tokens: int, flops, baseline_flops,
                truncated: bool) -> dict:
        record = {}
        if self.spec.is_regression:
            record["score"] = float(logits[0])
        else:
            names = self.spec.label_names
            probabilities = torch.softmax(logits.float(), dim=-1).tolist()
            best = int(logits.argmax())  # evaluation's prediction: argmax of the same logits
            record.update(label=names[best], score=probabilities[best],
                          probabilities=dict(zip(names, probabilities)))
        record.update(num_tokens=num_tokens, kept_per_layer=kept.tolist(), flops=int(flops),
                      baseline_flops=int(baseline_flops), flops_ratio=float(flops) / float(baseline_flops),
                      truncated=truncated)
        return record


# ---------------------------------------------------------------------------------------------
# Input files


@dataclass(frozen=True)
class InputRow:
    line: int
    """1-based line of the input it came from."""
    text_a: str
    text_b: str | None


def read_inputs(source: str, spec: TaskSpec) -> list[InputRow]:
    """The texts of ``source`` (a file, or ``-`` for stdin) for ``spec``'s task.

    A first line that names the task's text columns (tab-separated) is a header: the texts are
    read from those columns, others (a label) are ignored. CoLA's headerless GLUE layout is read as
    GLUE writes it. A ``.tsv`` file must be one of these; any other input holds one text per line
    (pair tasks: text_a, a tab, text_b). Blank lines are skipped.
    """
    name = "stdin" if source == "-" else str(source)
    text = sys.stdin.read() if source == "-" else _read_text(Path(source))
    lines = [(number, line.rstrip("\r")) for number, line in enumerate(text.removeprefix("\ufeff").split("\n"), 1)
             if line.strip()]
    if not lines:
        raise DynbertError(f"--input {name} is empty: pass one text per line, or a TSV whose header names "
                           f"{_needed_columns(spec)}")
    header = tuple(field.strip() for field in lines[0][1].split("\t"))
    needed = _needed_columns(spec)
    if all(column in header for column in needed):
        rows = _columns(name, lines[1:], header, [header.index(column) for column in needed])
    elif spec.tsv_columns and len(header) == len(spec.tsv_columns):
        rows = _columns(name, lines, spec.tsv_columns, [spec.tsv_columns.index(column) for column in needed])
    elif name.lower().endswith(".tsv"):
        missing = [column for column in needed if column not in header]
        raise DynbertError(f"--input {name} has columns {shorten(list(header), 120)} but {spec.name} needs a "
                           f"tab-separated header naming {needed} (missing {missing}); or pass a .txt file "
                           "with one text per line")
    elif spec.text_columns[1] is not None:
        rows = []
        for number, line in lines:
            fields = line.split("\t")
            if len(fields) != 2:
                raise DynbertError(f"--input {name} line {number} holds {len(fields)} tab-separated texts but "
                                   f"{spec.name} compares two: write text_a<TAB>text_b on each line, or a TSV "
                                   f"whose header names {needed}")
            rows.append(InputRow(number, fields[0], fields[1]))
    else:
        rows = [InputRow(number, line, None) for number, line in lines]
    if not rows:
        raise DynbertError(f"--input {name} has a header but no texts under it")
    return rows


def _needed_columns(spec: TaskSpec) -> list[str]:
    return [column for column in spec.tsv_text_columns if column is not None]


def _columns(name: str, lines: list[tuple[int, str]], header, indices: list[int]) -> list[InputRow]:
    rows = []
    for number, line in lines:
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DynbertError(f"--input {name} line {number} has {len(fields)} tab-separated columns, expected "
                               f"{len(header)} ({shorten(', '.join(header), 120)}); fix or remove that line")
        texts = [fields[index] for index in indices]
        rows.append(InputRow(number, texts[0], texts[1] if len(texts) > 1 else None))
    return rows


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise DynbertError(f"--input {path} is a folder: pass a file (TSV, or one text per line), or - for stdin")
    try:
        # newline="": only \n ends a line (split above), so a stray \r inside a text does not split a row.
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return handle.read()
    except FileNotFoundError:
        raise DynbertError(f"--input {path} does not exist") from None
    except UnicodeDecodeError as error:
        raise DynbertError(f"--input {path} is not UTF-8 text ({utf8_problem(path, error)})") from error
    except OSError as error:
        raise DynbertError(f"could not read --input {path} ({error.strerror or error}); "
                           "check its permissions") from error


# ---------------------------------------------------------------------------------------------
# Output files


def format_records(records: list[dict], rows: list[InputRow], fmt: str, spec: TaskSpec) -> str:
    """Predictions as TSV (a header, one line each) or JSON lines, each led by its input line."""
    if fmt == ".jsonl":
        return "".join(json.dumps({"line": row.line, **record}) + "\n" for row, record in zip(rows, records))
    labels = [] if spec.is_regression else ["label"]
    columns = ["line", *labels, "score", *[f"p_{name}" for name in spec.label_names], "num_tokens",
               "kept_per_layer", "flops", "baseline_flops", "flops_ratio", "truncated"]
    buffer = io.StringIO()
    buffer.write("\t".join(columns) + "\n")
    for row, record in zip(rows, records):
        cells = [str(row.line), *[record["label"] for _ in labels], f"{record['score']:.6g}",
                 *[f"{record['probabilities'][name]:.6g}" for name in spec.label_names],
                 str(record["num_tokens"]), ",".join(map(str, record["kept_per_layer"])), str(record["flops"]),
                 str(record["baseline_flops"]), f"{record['flops_ratio']:.6g}", str(record["truncated"]).lower()]
        buffer.write("\t".join(cells) + "\n")
    return buffer.getvalue()
