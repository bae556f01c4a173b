"""`dynbert inspect`, `dynbert predict` and ``dynbert.load``: they show and run what the hard pass does."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dynbert
from dynbert.data import collate, encode, load_splits
from dynbert.errors import DynbertError
from dynbert.evaluate import predict as evaluate_predict
from dynbert.inspection import inspection_figure
from dynbert.predictor import read_inputs
from dynbert.rundir import load_run_config
from dynbert.tasks import FILLER_WORDS, get_task
from dynbert.train import load_run

from glue_data import write_glue_run_folder
from helpers import FAST, SYNTHETIC, invoke, read_json, snapshot

# Gates that close within a few steps, and not all alike: with sparsity=tokens only the ranks that
# long inputs reach stay open, so the first layer keeps a few tokens of a long input (about 16% of
# the dev set's tokens), the second only CLS. Deterministic on a CPU.
PARTLY_PRUNED = ["lambda=1", "method.start=0", "method.bimodal_weight=0", "method.lr=0.1", "method.sparsity=tokens",
                 "train.max_steps=6"]
TEXT = " ".join([*FILLER_WORDS[:36], "not", "fine"])  # 38 words: long enough to reach the open ranks


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny synthetic run whose gates drop some tokens, and its dev set as a TSV file."""
    folder = tmp_path_factory.mktemp("inspect") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = invoke("train", *FAST, *SYNTHETIC, *PARTLY_PRUNED, f"output_dir={folder}")
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    metrics = read_json(folder / "metrics.json")
    assert metrics["flops_ratio"] < 1 and 1 / 32 < metrics["kept_per_layer"][0] < 1  # some kept, some dropped
    return folder


def dev_examples(run_dir):
    """The examples the run's evaluation scored (its config, its data, its limits)."""
    cfg = load_run_config(run_dir)
    return load_splits(cfg, get_task(cfg.task.name))["validation"]


def write_tsv(path, examples):
    path.write_text("sentence\tlabel\n" + "".join(f"{e.text_a}\t{e.label}\n" for e in examples))
    return path


def one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# The engine's scores


def test_asking_for_scores_changes_nothing_and_marks_what_each_layer_ranked(run):
    gated = load_run(run).eval()
    data = encode(dev_examples(run)[:8], load_run_tokenizer(run), gated.max_length, get_task("synthetic"))
    batch = collate(data, list(range(8)))
    with torch.no_grad():
        plain = gated(batch.input_ids, batch.attention_mask, batch.token_type_ids, hard=True)
        scored = gated(batch.input_ids, batch.attention_mask, batch.token_type_ids, hard=True, return_scores=True)
    assert plain.scores is None
    assert torch.equal(plain.logits, scored.logits) and torch.equal(plain.present, scored.present)
    entering = torch.cat([batch.attention_mask.bool()[:, None], scored.present[:, :-1]], dim=1)
    assert torch.equal(~torch.isnan(scored.scores), entering)  # every present token was ranked, nothing else

    # A layer whose gates are all open keeps every token: hard mode skips ranking there, and says so.
    with torch.no_grad():
        gated.method.gates.raw[0] = 1.0
        out = gated(batch.input_ids, batch.attention_mask, batch.token_type_ids, hard=True, return_scores=True)
    assert torch.isnan(out.scores[:, 0]).all()
    assert torch.equal(out.present[:, 0], batch.attention_mask.bool())
    assert not torch.isnan(out.scores[:, 1]).all()


def load_run_tokenizer(run_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run_dir / "model")


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_reports_exactly_the_tokens_the_hard_pass_kept(run):
    inspection = dynbert.load(run, device="cpu").inspect(TEXT)
    # The hard pass, run here on its own.
    gated, tokenizer = load_run(run).eval(), load_run_tokenizer(run)
    # Cut to the run's length as inspect cuts it: a tokenizer trained on 64 short texts splits
    # the filler words it rarely saw, and TEXT takes more tokens than the run's 48.
    encoded = tokenizer(TEXT, return_tensors="pt", truncation=True, max_length=gated.max_length)
    with torch.no_grad():
        out = gated(encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"], hard=True)
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    assert inspection.tokens == tokens
    assert inspection.present == out.present[0].tolist()
    for layer in range(gated.num_layers):
        kept = [tokens[position] for position in out.present[0, layer].nonzero().flatten().tolist()]
        assert inspection.kept_tokens(layer) == kept
    assert 1 < len(inspection.kept_tokens(0)) < len(tokens)  # a real decision, not all or nothing
    flops, baseline = gated.flops(out)
    assert inspection.prediction["flops"] == int(flops[0])
    assert inspection.prediction["baseline_flops"] == int(baseline[0])
    assert inspection.prediction["label"] == ("negative", "positive")[int(out.logits[0].argmax())]


def test_inspect_prints_the_survivors_and_draws_the_layers(run, tmp_path):
    inspection = dynbert.load(run, device="cpu").inspect(TEXT)
    result = invoke("inspect", run, TEXT, "--out", tmp_path / "picture.png")
    assert result.exit_code == 0, result.output
    survivors = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("after L")]
    assert survivors == [" ".join(inspection.kept_tokens(layer)) for layer in range(2)]
    assert inspection.prediction["label"] in result.stdout.splitlines()[0]
    assert result.stdout.splitlines()[-1] == str(tmp_path / "picture.png")

    png = (tmp_path / "picture.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    figure = inspection_figure(inspection)
    image = figure.axes[0].images[0].get_array()
    assert image.shape == (2, len(inspection.tokens))  # layers × tokens
    assert image.tolist() == inspection.states()
    assert [label.get_text() for label in figure.axes[0].get_yticklabels()] == ["layer 0", "layer 1"]
    import matplotlib.image

    height = figure.get_size_inches()[1] * 150  # the dpi write_picture uses
    assert matplotlib.image.imread(tmp_path / "picture.png").shape[0] == round(height)

    for suffix in ("svg", "html"):
        assert invoke("inspect", run, TEXT, "--out", tmp_path / f"picture.{suffix}").exit_code == 0
    assert "<svg" in (tmp_path / "picture.svg").read_text()
    page = (tmp_path / "picture.html").read_text()
    assert page.count("<tr><th>layer ") == 2 and page.count("<td ") == 2 * len(inspection.tokens)


def test_inspect_input_draws_one_picture_per_row_up_to_the_limit(run, tmp_path):
    examples = dev_examples(run)[:3]
    result = invoke("inspect", run, "--input", write_tsv(tmp_path / "few.tsv", examples), "--limit", 2,
                    "--out", tmp_path / "shots" / "row.svg")
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in (tmp_path / "shots").iterdir()) == ["row-line2.svg", "row-line3.svg"]
    assert result.stdout.count("after L1") == 2


# ---------------------------------------------------------------------------------------------
# predict


def test_predict_gives_the_evaluations_predictions_and_flops_ratio(run, tmp_path):
    examples = dev_examples(run)
    result = invoke("predict", run, "--input", write_tsv(tmp_path / "dev.tsv", examples), "--out",
                    tmp_path / "predictions.tsv")
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "predictions.tsv").read_text().splitlines()
    header, rows = lines[0].split("\t"), [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]
    assert header[:5] == ["line", "label", "score", "p_negative", "p_positive"]
    assert [row["line"] for row in rows] == [str(n) for n in range(2, len(examples) + 2)]
    metrics = read_json(run / "metrics.json")
    spec = get_task("synthetic")

    labels = [spec.label_names.index(row["label"]) for row in rows]
    accuracy = sum(label == e.label for label, e in zip(labels, examples)) / len(examples)
    assert accuracy == metrics["score"]
    # Evaluation's own predictions, per example, made again the way training made them.
    cfg = load_run_config(run)
    gated = load_run(run)
    data = encode(examples, load_run_tokenizer(run), cfg.task.max_length, spec)
    evaluated = evaluate_predict(gated, data, cfg.train.eval_batch_size, hard=True, spec=spec)
    assert labels == evaluated["predictions"].tolist()
    assert [int(row["flops"]) for row in rows] == [int(f) for f in evaluated["flops"]]

    ratio = sum(int(row["flops"]) for row in rows) / sum(int(row["baseline_flops"]) for row in rows)
    assert ratio == pytest.approx(metrics["flops_ratio"], rel=1e-12)
    kept = [[int(k) / int(row["num_tokens"]) for k in row["kept_per_layer"].split(",")] for row in rows]
    assert [sum(column) / len(kept) for column in zip(*kept)] == pytest.approx(metrics["kept_per_layer"], rel=1e-12)
    assert f"{len(examples)} examples in " in result.stderr and "examples/s" in result.stderr
    assert f"mean FLOPs ratio {metrics['flops_ratio']:.3f}" in result.stderr


def test_predict_reads_lines_from_stdin_writes_jsonl_and_matches_the_python_api(run, tmp_path):
    texts = [e.text_a for e in dev_examples(run)[:5]]
    result = invoke("predict", run, "--input", "-", "--format", "jsonl", stdin="\n".join(texts) + "\n\n")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [record.pop("line") for record in records] == [1, 2, 3, 4, 5]
    from_api = dynbert.load(run, device="cpu").predict(texts)
    assert records == from_api
    for record in records:
        assert set(record["probabilities"]) == {"negative", "positive"}
        assert record["score"] == record["probabilities"][record["label"]] == max(record["probabilities"].values())
        assert math.isclose(sum(record["probabilities"].values()), 1, rel_tol=1e-6)
        assert record["flops_ratio"] == record["flops"] / record["baseline_flops"] <= 1
        assert len(record["kept_per_layer"]) == 2 and record["truncated"] is False
    # Only a few gates closed, and a short text's relative ranks can miss all of them.
    assert any(record["flops_ratio"] < 1 for record in records)


@pytest.fixture(scope="module")
def stsb_run(tmp_path_factory):
    """A tiny STS-B run: pairs of texts in, a float out."""
    root = tmp_path_factory.mktemp("stsb")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data_dir = write_glue_run_folder(root / "glue", "stsb")
        result = invoke("train", *FAST, "task=stsb", "model=tiny", f"task.data_dir={data_dir}",
                        f"output_dir={root / 'run'}")
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return root


def test_predict_a_pair_task_from_its_glue_tsv_and_from_pairs(stsb_run, tmp_path):
    run = stsb_run / "run"
    result = invoke("predict", run, "--input", stsb_run / "glue" / "dev.tsv")
    assert result.exit_code == 0, result.output
    header, *rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert header[:2] == ["line", "score"] and "label" not in header
    pairs = [("A man plays.", "A man is playing."), ("A cat.", "A plane.")]
    records = dynbert.load(run, device="cpu").predict(pairs * 3)
    assert [float(row[1]) for row in rows] == pytest.approx([record["score"] for record in records], abs=1e-5)
    assert all(isinstance(record["score"], float) and "label" not in record for record in records)

    lines = invoke("predict", run, "--input", "-", "--format", "jsonl", stdin="A man plays.\tA man is playing.\n")
    assert json.loads(lines.stdout)["score"] == pytest.approx(records[0]["score"])
    one_line_error(invoke("predict", run, "--input", "-", stdin="A man plays.\n"), "line 1", "text_a<TAB>text_b")
    one_line_error(invoke("inspect", run, "A man plays."), "stsb compares two texts")
    with pytest.raises(DynbertError, match="pairs"):
        dynbert.load(run, device="cpu").predict(["A man plays."])


# GLUE's own files, where the checkout sits beside them (../shared/data): a fresh clone skips this.
REAL_GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
REAL_DEV_SIZES = {"cola": ("CoLA", 1043), "sst2": ("SST-2", 872), "mrpc": ("MRPC", 408), "stsb": ("STS-B", 1500),
                  "rte": ("RTE", 277), "wnli": ("WNLI", 71)}


@pytest.mark.requires_data("glue")
@pytest.mark.parametrize("task", REAL_DEV_SIZES)
def test_predict_reads_glues_own_dev_files(task):
    folder, size = REAL_DEV_SIZES[task]
    rows = read_inputs(str(REAL_GLUE / folder / "dev.tsv"), get_task(task))
    assert len(rows) == size  # CoLA without a header, MRPC's byte-order mark, pairs: every row, once
    assert all(row.text_a and (row.text_b is None) == (get_task(task).text_columns[1] is None) for row in rows)


# ---------------------------------------------------------------------------------------------
# Interop


def test_plain_transformers_loads_the_unpruned_classifier_with_the_task_label_names(run):
    from transformers import pipeline

    config = json.loads((run / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    answers = pipeline("text-classification", model=str(run / "model"), device="cpu")([TEXT, "good"])
    assert {answer["label"] for answer in answers} <= {"negative", "positive"}


def test_import_dynbert_does_not_import_torch():
    code = "import sys, dynbert; assert callable(dynbert.load); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


# ---------------------------------------------------------------------------------------------
# Bad input: one sentence, exit 2, nothing written


def test_unfinished_or_foreign_run_folders_are_one_sentence(run, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "metrics.json").unlink()
    one_line_error(invoke("inspect", unfinished, TEXT), "not a finished run", "metrics.json")
    one_line_error(invoke("predict", unfinished, "--input", "-", stdin="good\n"), "not a finished run")
    no_model = tmp_path / "no-model"
    shutil.copytree(run, no_model)
    shutil.rmtree(no_model / "model")
    one_line_error(invoke("inspect", no_model, TEXT), "holds no trained model")
    one_line_error(invoke("inspect", tmp_path / "absent", TEXT), "does not exist")
    (tmp_path / "plain").mkdir()
    one_line_error(invoke("predict", tmp_path / "plain", "--input", "-", stdin="good\n"), "not a run folder")
    with pytest.raises(DynbertError, match="not a finished run"):
        dynbert.load(unfinished)


def test_bad_inputs_are_one_sentence_and_write_nothing(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "wrong.tsv").write_text("text\tlabel\ngood\t1\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "header-only.tsv").write_text("sentence\tlabel\n")
    (tmp_path / "a-file").write_text("")
    before = snapshot(tmp_path)
    one_line_error(invoke("predict", run, "--input", tmp_path / "wrong.tsv"), "sentence", "missing")
    one_line_error(invoke("predict", run, "--input", tmp_path / "empty.txt"), "is empty")
    one_line_error(invoke("inspect", run, "--input", tmp_path / "empty.txt"), "is empty")
    one_line_error(invoke("predict", run, "--input", tmp_path / "header-only.tsv"), "no texts")
    one_line_error(invoke("predict", run, "--input", "-", stdin=""), "stdin is empty")
    one_line_error(invoke("predict", run, "--input", tmp_path / "absent.tsv"), "does not exist")
    one_line_error(invoke("inspect", run, "  "), "empty")
    one_line_error(invoke("inspect", run, TEXT, "--input", tmp_path / "wrong.tsv"), "not both")
    one_line_error(invoke("inspect", run, TEXT, "extra"), "takes one text")
    # --out is checked before anything is loaded: even a run folder that does not exist is not reached.
    for command, extra, name in (("inspect", [TEXT], "x.png"), ("predict", ["--input", "-"], "x.tsv")):
        one_line_error(invoke(command, tmp_path / "no-run", *extra, "--out", out, stdin="good\n"), "is a folder")
        one_line_error(invoke(command, tmp_path / "no-run", *extra, "--out", tmp_path / "a-file" / name,
                              stdin="good\n"), "a-file is a file")
    one_line_error(invoke("inspect", run, TEXT, "--out", tmp_path / "x.jpg"), ".png or .svg or .html")
    one_line_error(invoke("predict", run, "--input", "-", "--out", tmp_path / "x.csv", stdin="good\n"),
                   ".tsv or .jsonl")
    one_line_error(invoke("predict", run, "--input", "-", "--format", "jsonl", "--out", tmp_path / "x.tsv",
                          stdin="good\n"), "--format")
    assert snapshot(tmp_path) == before


def test_the_python_api_refuses_a_bad_batch_size_or_no_texts_in_one_sentence(run):
    """batch_size=-3 and None failed with torch's or Python's own errors."""
    model = dynbert.load(run)
    for batch_size in (-3, 0, 2.5, True):
        with pytest.raises(DynbertError, match=rf"batch_size={batch_size!r} is not valid: pass an integer >= 1"):
            model.predict(["good"], batch_size=batch_size)
    for texts in (None, 3):
        with pytest.raises(DynbertError, match=f"predict takes a list of texts, not {type(texts).__name__}"):
            model.predict(texts)
    assert len(model.predict(["good"], batch_size=1)) == 1


def test_a_text_longer_than_the_run_allows_is_truncated_and_said_once(run, tmp_path):
    long_text = " ".join(["fine"] * 80)  # the synthetic run takes 48 tokens
    result = invoke("predict", run, "--input", "-", "--format", "jsonl", stdin=f"{long_text}\n{long_text}\ngood\n")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["truncated"] for line in result.stdout.splitlines()] == [True, True, False]
    assert [json.loads(line)["num_tokens"] for line in result.stdout.splitlines()][0] == 48
    notes = [line for line in result.stderr.splitlines() if "longer than" in line]
    assert notes == ["note: 2 of 3 inputs are longer than the run's 48 tokens (task.max_length) and were cut to "
                     "that length"]
    result = invoke("inspect", run, long_text)
    assert result.exit_code == 0
    assert result.stderr.splitlines() == ["note: the input is longer than the run's 48 tokens (task.max_length) and "
                                          "was cut to that length"]
