"""`dynbert export`: a run's pruned model, served without dynbert.

Two formats:

- ``hf``: a transformers folder (config.json, model.safetensors, the tokenizer) plus
  ``modeling_dynbert.py`` (``export_modeling.py``, copied), which ``auto_map`` names, so
  ``AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)`` and
  ``pipeline("text-classification", model=folder, trust_remote_code=True)`` run the model pruned,
  with only torch and transformers installed. The run's decision rule goes into config.json
  (``dynbert``), read from dynbert's own method objects (``pruning_rule``).
- ``onnx``: ``model.onnx`` (the same forward through ``torch.onnx.export``, dynamo: dynamic batch and
  length, the scoring, ranking and gathering in the graph), the tokenizer and config.json beside
  it; ``--quantize int8`` adds ``model.int8.onnx`` (onnxruntime's dynamic quantization).

Unless told not to, the export is compared with dynbert's hard mode on the run's dev split (the
batches its evaluation used): prediction agreement, the largest logit difference, identical kept
counts, and the task's score of each; written to ``export.json`` and printed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch

from . import export_modeling
from .core import GatedModel, flops_per_example
from .data import Encoded, collate, encode, load_splits
from .errors import FILE_MODE, DynbertError, atomic_write_json, check_writable_folder, first_line
from .methods import registered
from .tasks import TaskSpec, compute_metrics

FORMATS = ("hf", "onnx")
QUANTIZATIONS = ("int8",)
MODELING_FILE = "modeling_dynbert.py"
ONNX_FILE, ONNX_INT8_FILE = "model.onnx", "model.int8.onnx"
REPORT_FILE = "export.json"
ONNX_PACKAGES = ("onnxruntime", "onnx", "onnxscript")
ONNX_INSTALL = "pip install -e '.[onnx]'"
AGREEMENT_WANTED = 0.999
"""Below this share of dev predictions equal to dynbert's, the export warns."""
REGRESSION_TOLERANCE = 1e-3
"""A regression prediction (STS-B) agrees when within this of dynbert's."""


# ---------------------------------------------------------------------------------------------
# The decision rule, from dynbert's methods


def pruning_rule(method) -> dict:
    """``config.dynbert`` for ``export_modeling``: what ``method`` decides in hard mode, as plain values.

    Read through the method's own ``prepare(hard=True)`` and its ``export_rule``, so the export decides
    what dynbert's hard mode decides. ``keeps_all_up_to``: per pruned layer, the longest (gathered)
    input the method certainly keeps whole (``TokenPruner.keeps_all``), which it skips.
    """
    rule = dict(layers=list(method.layers), max_length=method.max_length, score=method.score)
    with torch.no_grad():
        state = method.prepare(hard=True)
        own = method.export_rule(state)
    if own is None:
        raise DynbertError(f"method {method.name} has no export rule: export_modeling.py knows "
                           f"{', '.join(export_modeling.RULES)}")
    rule.update(own)
    rule["keeps_all_up_to"] = [_keeps_all_up_to(method, state, row) for row in range(len(method.layers))]
    return rule


def _keeps_all_up_to(method, state, row: int) -> int:
    """The longest input length up to which ``method.keeps_all`` holds at ``row`` (0: none)."""
    keeps = [method.keeps_all(state, row, length) for length in range(1, method.max_length + 1)]
    up_to = keeps.index(False) if False in keeps else len(keeps)
    # Every shipped method keeps short inputs whole and long ones not (or all or none alike); one
    # that did otherwise could not be written as a single length.
    if any(keeps[up_to:]):
        raise DynbertError(f"method {method.name} keeps every token of some lengths but not of shorter ones "
                           f"at pruned layer {method.layers[row]}: export_modeling.py cannot express that")
    return up_to


def exported_classifier(gated: GatedModel, prune: bool = True) -> torch.nn.Module:
    """The export's classifier (``export_modeling``), the run's weights copied: its hard-mode forward
    (``prune=False``: the same weights, nothing dropped, exported alike: the dense reference)."""
    model_type = gated.model.config.model_type
    if model_type not in export_modeling.CLASSES:
        raise DynbertError(f"the export's modeling file has no {model_type} model (it serves "
                           f"{', '.join(sorted(export_modeling.CLASSES))}): use this run with `dynbert predict`")
    cls = export_modeling.CLASSES[model_type]
    config = cls.config_class.from_dict(_config_with_rule(gated, prune).to_dict())
    config.architectures = [cls.__name__]
    module = Path(MODELING_FILE).stem
    config.auto_map = {"AutoConfig": f"{module}.{cls.config_class.__name__}",
                       "AutoModelForSequenceClassification": f"{module}.{cls.__name__}"}
    model = cls(config)
    model.load_state_dict(gated.model.state_dict())
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The command


def require_onnx(what: str) -> None:
    """One sentence naming what to install when ONNX export or ONNX Runtime is missing."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise DynbertError(f"{what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                           f"installed: {ONNX_INSTALL}")


def check_export(run_dir: Path, out: Path, fmt: str, quantize: str | None):
    """The run's config and task, or one sentence on why this export cannot be done (before any work)."""
    from .predictor import finished_run

    if fmt not in FORMATS:
        raise DynbertError(f"--format {fmt} is not one of {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise DynbertError(f"--quantize {quantize} is not one of {', '.join(QUANTIZATIONS)}")
    if quantize is not None and fmt != "onnx":
        raise DynbertError("--quantize is for --format onnx (onnxruntime's dynamic quantization): add --format onnx")
    check_writable_folder(out, "--out")
    if out.is_dir() and any(out.iterdir()):
        raise DynbertError(f"--out {out} is not empty: pass a new or empty folder")
    cfg, spec = finished_run(run_dir)
    if fmt == "onnx":
        require_onnx("--format onnx")
    return cfg, spec


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, fmt: str = "hf", quantize: str | None = None,
               check: bool = True, console=None) -> dict:
    """Export the finished run in ``run_dir`` to the new folder ``out``; return ``export.json``'s content.

    The folder appears complete or not at all (written beside it, then renamed).
    """
    from .predictor import load

    run_dir, out = Path(run_dir).expanduser(), Path(out).expanduser()
    cfg, spec = check_export(run_dir, out, fmt, quantize)
    predictor = load(run_dir, "cpu")
    gated, tokenizer = predictor.gated, predictor.tokenizer
    dev = dev_split(cfg, spec, tokenizer) if check else None
    model = exported_classifier(gated)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    try:
        report = dict(run=str(run_dir), format=fmt, method=gated.method.name, model_type=gated.model.config.model_type,
                      pruning=model.config.dynbert["rule"], max_length=gated.max_length)
        if fmt == "hf":
            write_hf(model, tokenizer, staging)
            if dev is not None:
                reloaded = type(model).from_pretrained(staging).eval()
                report["check"] = compare(gated, dev, spec, predictor.batch_size,
                                          {"transformers": torch_runner(reloaded)})
        else:
            write_tokenizer(tokenizer, gated.max_length, staging)
            # Beside model.onnx, for its readers (labels, sizes, the rule): the family's own config.
            _config_with_rule(gated).save_pretrained(staging)
            write_onnx(model, tokenizer, staging / ONNX_FILE)
            runners = {"onnxruntime": OnnxClassifier(staging / ONNX_FILE)}
            if quantize == "int8":
                quantize_int8(staging / ONNX_FILE, staging / ONNX_INT8_FILE)
                runners["onnxruntime int8"] = OnnxClassifier(staging / ONNX_INT8_FILE)
            if dev is not None:
                report["check"] = compare(gated, dev, spec, predictor.batch_size, runners)
        atomic_write_json(staging / REPORT_FILE, report)
        for path in staging.iterdir():  # safetensors writes 0600 whatever the umask
            path.chmod(FILE_MODE)
        if out.is_dir():
            out.rmdir()  # checked empty above; the rename needs the name free
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if console is not None:
        print_report(console, report, out)
    return report


def dev_split(cfg, spec: TaskSpec, tokenizer) -> Encoded:
    """The run's first evaluation split, encoded as its evaluation encoded it."""
    examples = load_splits(cfg, spec)[spec.eval_splits[0]]
    return encode(examples, tokenizer, cfg.task.max_length, spec)


def write_tokenizer(tokenizer, max_length: int, folder: Path) -> None:
    """The run's tokenizer, its ``model_max_length`` the run's: ``truncation=True`` cuts where dynbert does."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(folder)


def write_hf(model, tokenizer, folder: Path) -> None:
    """The transformers folder: weights, config (with ``auto_map`` and the rule), tokenizer, modeling file."""
    model.save_pretrained(folder)
    write_tokenizer(tokenizer, model.max_length, folder)
    shutil.copyfile(export_modeling.__file__, folder / MODELING_FILE)


def _config_with_rule(gated: GatedModel, prune: bool = True):
    """The run's model config (its family, sizes and labels) with the decision rule as ``dynbert``."""
    config = copy.deepcopy(gated.model.config)
    config.dynbert = pruning_rule(gated.method if prune else registered("none")([], gated.max_length))
    return config


# ---------------------------------------------------------------------------------------------
# ONNX


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx prints its progress and warnings about packages it does not need, onnxruntime's
    quantizer advice on the root logger; dynbert prints its own."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def write_onnx(model, tokenizer, path: Path) -> None:
    """``model`` (an ``exported_classifier``) as ONNX: inputs input_ids, attention_mask (and
    token_type_ids where the family reads them), outputs logits and kept; batch and length dynamic
    (the length up to the run's max_length)."""
    from torch.export import Dim

    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if model.has_token_types else [])
    # Two rows of different lengths, so nothing is specialised to one size or to no padding.
    example = tokenizer(["an example", "a longer example text for tracing"], padding=True, truncation=True,
                        max_length=model.max_length, return_tensors="pt")
    example = {name: example[name] for name in names}
    axes = {0: Dim("batch"), 1: Dim("sequence", max=model.max_length)}
    try:
        with _quiet_exporter():
            program = torch.onnx.export(model, (), kwargs=example, dynamo=True, input_names=names,
                                        output_names=["logits", "kept"], dynamic_shapes={name: axes for name in names},
                                        external_data=False, verbose=False)
            program.save(str(path))
    except Exception as error:  # noqa: BLE001 - the exporter's failure, in one sentence
        raise DynbertError(f"torch.onnx.export failed on {type(model).__name__} "
                           f"({error.__class__.__name__}: {first_line(error)})") from error


def quantize_int8(source: Path, target: Path) -> None:
    """onnxruntime's dynamic quantization: int8 weights of the matrix products, activations quantized per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_exporter():
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)


class OnnxClassifier:
    """An exported model.onnx in an onnxruntime CPU session: ``(input_ids, attention_mask, token_type_ids)
    -> (logits, kept)`` as torch tensors."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [item.name for item in self.session.get_inputs()]

    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        if token_type_ids is None:  # what the embeddings take when given none: segment A throughout
            token_type_ids = torch.zeros_like(input_ids)
        given = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        logits, kept = self.session.run(None, {name: given[name].numpy() for name in self.inputs})
        return torch.from_numpy(logits), torch.from_numpy(kept)


def dynbert_runner(gated: GatedModel):
    """dynbert's hard mode as a ``(input_ids, attention_mask, token_type_ids) -> (logits, kept)`` call."""
    @torch.inference_mode()
    def run(input_ids, attention_mask, token_type_ids=None):
        out = gated(input_ids, attention_mask, token_type_ids, hard=True)
        return out.logits, out.kept
    return run


def torch_runner(model):
    """An exported transformers model as a ``(input_ids, attention_mask, token_type_ids) -> (logits, kept)`` call."""
    @torch.inference_mode()
    def run(input_ids, attention_mask, token_type_ids=None):
        out = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.logits, out.kept
    return run


# ---------------------------------------------------------------------------------------------
# The check against dynbert


def run_batches(runner, data: Encoded, batches: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, kept) of every example, in ``data``'s order, running ``batches`` of its indices."""
    logits, kept = [None] * len(data), [None] * len(data)
    for indices in batches:
        batch = collate(data, indices)
        batch_logits, batch_kept = runner(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        for row, i in enumerate(indices):
            logits[i], kept[i] = batch_logits[row].float(), batch_kept[row]
    return torch.stack(logits), torch.stack(kept)


def sorted_batches(data: Encoded, batch_size: int) -> list[list[int]]:
    """Evaluation's batches (``evaluate.predict``): indices sorted by length, cut every ``batch_size``."""
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def predictions(spec: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    return logits[:, 0] if spec.is_regression else logits.argmax(dim=-1)


def agreement(spec: TaskSpec, these: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of predictions equal to the reference's (regression: within ``REGRESSION_TOLERANCE``)."""
    same = (these - reference).abs() <= REGRESSION_TOLERANCE if spec.is_regression else these == reference
    return same.double().mean().item()


def compare(gated: GatedModel, data: Encoded, spec: TaskSpec, batch_size: int, runners: dict) -> dict:
    """Each runner against dynbert's hard mode on ``data``, in evaluation's batches: agreement, the
    largest logit difference, identical kept counts, score and FLOPs ratio."""
    batches = sorted_batches(data, batch_size)
    reference_logits, reference_kept = run_batches(dynbert_runner(gated), data, batches)
    reference = predictions(spec, reference_logits)
    labels = data.labels.tolist()
    num_tokens = torch.tensor(data.lengths)
    dims = gated.encoder.dims
    baseline = flops_per_example(num_tokens, num_tokens[:, None].expand(-1, dims.num_layers), dims).sum().item()

    def summary(logits, kept) -> dict:
        return dict(score=compute_metrics(spec, predictions(spec, logits).tolist(), labels)[spec.main_metric],
                    flops_ratio=flops_per_example(num_tokens, kept, dims).sum().item() / baseline)

    result = dict(examples=len(data), batch_size=batch_size, metric=spec.main_metric,
                  dynbert=summary(reference_logits, reference_kept))
    for name, runner in runners.items():
        logits, kept = run_batches(runner, data, batches)
        result[name] = dict(summary(logits, kept), agreement=agreement(spec, predictions(spec, logits), reference),
                            max_abs_logit_difference=(logits - reference_logits).abs().max().item(),
                            same_kept=(kept == reference_kept).all(dim=1).double().mean().item())
    return result


def print_report(console, report: dict, out: Path) -> None:
    """One line per exported model against dynbert's hard mode, and a warning where they disagree."""
    check = report.get("check")
    console.print(f"exported {report['method']} ({report['model_type']}) as {report['format']} to {out}",
                  highlight=False, soft_wrap=True)
    if check is None:
        return
    reference = check["dynbert"]
    console.print(f"dev set, {check['examples']} examples: dynbert {check['metric']} {reference['score']:.4f}, "
                  f"FLOPs ratio {reference['flops_ratio']:.3f}", highlight=False, soft_wrap=True)
    for name, row in check.items():
        if not isinstance(row, dict) or name == "dynbert":
            continue
        console.print(f"{name}: {check['metric']} {row['score']:.4f} ({row['score'] - reference['score']:+.4f}), "
                      f"agreement {100 * row['agreement']:.2f}%, max |Δ logit| {row['max_abs_logit_difference']:.2g}, "
                      f"same kept tokens {100 * row['same_kept']:.2f}%, FLOPs ratio {row['flops_ratio']:.3f}",
                      highlight=False, soft_wrap=True)
        if row["agreement"] < AGREEMENT_WANTED and "int8" not in name:
            console.print(f"[yellow]warning:[/] {name} agrees with dynbert's hard mode on "
                          f"{100 * row['agreement']:.2f}% of the dev predictions, below "
                          f"{100 * AGREEMENT_WANTED:.1f}%", highlight=False, soft_wrap=True)
