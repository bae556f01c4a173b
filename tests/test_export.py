"""`dynbert export` and `dynbert bench --inputs dev`: the pruned model served without dynbert.

Tiny runs (every method on BERT; RoBERTa, DistilBERT and ELECTRA with other methods), exported as
transformers folders and loaded in a process where dynbert cannot be imported; one exported to
ONNX and run with onnxruntime; the serving bench; bad input. No timing assertions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dynbert
from dynbert.data import collate
from dynbert.export import AGREEMENT_WANTED, MODELING_FILE, ONNX_FILE, ONNX_INT8_FILE, REPORT_FILE, export_run
from dynbert.serve_bench import SERVE_BENCH_FILE, TARGETS
from dynbert.tasks import FILLER_WORDS

from helpers import FAST, SYNTHETIC, invoke, read_json

ROOT = Path(__file__).resolve().parents[1]
# Settings under which each method drops tokens within a few steps (the gates': tests/test_inspect.py).
GATES = ["lambda=1", "method.start=0", "method.bimodal_weight=0", "method.lr=0.1", "method.sparsity=tokens",
         "train.max_steps=6"]
RUNS = {
    "gates": GATES,
    "power_bert": ["method=power_bert", "lambda=1", "method.lr=0.5", "method.start=0", "method.retrain_at=0.5"],
    "ltp": ["method=ltp", "lambda=0.1", "method.threshold=0.05", "method.start=0", "method.freeze_at=0.5"],
    "topk": ["method=topk", "method.keep=0.5"],
    "random": ["method=random", "method.keep=0.5"],
    "none": ["method=none"],
    # The other families, each with another method (and the gates with absolute ranks).
    "roberta-random": ["model.family=roberta", "method=random", "method.keep=0.5"],
    "distilbert-ltp": ["model.family=distilbert", "method=ltp", "lambda=0.1", "method.threshold=0.05",
                       "method.start=0", "method.freeze_at=0.5"],
    "electra-gates": ["model.family=electra", *GATES, "method.ranks=absolute"],
}
LONG_TEXT = " ".join([*FILLER_WORDS, "not", "good"] * 2)  # past max_length: truncated alike by both


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny synthetic run per entry of RUNS, every pruned one dropping some tokens."""
    root = tmp_path_factory.mktemp("export-runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, overrides in RUNS.items():
            result = invoke("train", *FAST, *SYNTHETIC, *overrides, f"output_dir={root / name}")
            assert result.exit_code == 0, result.output
            ratio = read_json(root / name / "metrics.json")["flops_ratio"]
            assert (ratio == 1) if name == "none" else (ratio < 1), (name, ratio)
    finally:
        torch.set_num_threads(threads)
    return {name: root / name for name in RUNS}


@pytest.fixture(scope="module")
def hf_exports(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-hf")
    reports = {name: export_run(run, root / name) for name, run in runs.items()}
    return {name: root / name for name in runs}, reports


def dev_texts(run_dir) -> list[str]:
    from dynbert.data import load_splits
    from dynbert.rundir import load_run_config
    from dynbert.tasks import get_task

    cfg = load_run_config(run_dir)
    return [example.text_a for example in load_splits(cfg, get_task(cfg.task.name))["validation"][:12]] + [LONG_TEXT]


# A process where `import dynbert` fails: the exported folder must carry everything it runs.
WITHOUT_DYNBERT = r"""
import json, sys
sys.modules["dynbert"] = None
sys.path = [entry for entry in sys.path if not entry.startswith(sys.argv[1])]
try:
    import dynbert
except ImportError:
    pass
else:
    raise SystemExit("dynbert was importable")
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
import torch

results = {}
for folder, texts in json.loads(sys.argv[2]).items():
    classify = pipeline("text-classification", model=folder, trust_remote_code=True)
    scores = classify(texts, truncation=True, top_k=None)
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # it reads the config too
    with torch.no_grad():
        out = model(**tokenizer(texts, truncation=True, padding=True, return_tensors="pt"))
    results[folder] = dict(scores=scores, logits=out.logits.tolist(), kept=out.kept.tolist(),
                           module=type(model).__module__, pipeline_module=type(classify.model).__module__)
print(json.dumps(results))
"""


@pytest.mark.slow
def test_hf_exports_load_pruned_without_dynbert_and_predict_what_dynbert_predicts(runs, hf_exports, tmp_path):
    folders, reports = hf_exports
    for name, report in reports.items():  # export's own check: the reloaded folder against dynbert
        check = report["check"]["transformers"]
        assert check["agreement"] == 1 and check["same_kept"] == 1, (name, check)
        assert check["max_abs_logit_difference"] <= 1e-6, (name, check)
        assert (folders[name] / MODELING_FILE).is_file() and (folders[name] / REPORT_FILE).is_file()
    texts = {str(folders[name]): dev_texts(run) for name, run in runs.items()}
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    # -I: no PYTHONPATH, no user site; the repository's own entries are dropped from sys.path too.
    done = subprocess.run([sys.executable, "-I", "-c", WITHOUT_DYNBERT, str(ROOT), json.dumps(texts)],
                          capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    for name, run in runs.items():
        result, these = loaded[str(folders[name])], texts[str(folders[name])]
        assert result["module"].endswith("modeling_dynbert") and result["pipeline_module"] == result["module"]
        predictor = dynbert.load(run, "cpu")
        records = predictor.predict(these)
        for record, scores in zip(records, result["scores"]):
            assert scores[0]["label"] == record["label"], name
            for entry in scores:
                assert entry["score"] == pytest.approx(record["probabilities"][entry["label"]], abs=1e-5), name
        assert [record["kept_per_layer"] for record in records] == result["kept"], name
        assert records[-1]["truncated"]
        # The same batch through dynbert's hard mode: the same logits.
        encoded, _ = predictor.encode([(text, None) for text in these])
        batch = collate(encoded, list(range(len(these))))
        with torch.no_grad():
            out = predictor.gated(batch.input_ids, batch.attention_mask, batch.token_type_ids, hard=True)
        assert torch.allclose(out.logits, torch.tensor(result["logits"]), atol=1e-5), name


def hand_set_methods(layers: int, length: int, heads: int) -> dict:
    """Every method with decisions that drop some tokens, set by hand (no training)."""
    from dynbert.methods.gates import Gates
    from dynbert.methods.ltp import LearnedTokenPruning
    from dynbert.methods.none import NoPruning
    from dynbert.methods.power_bert import PowerBert
    from dynbert.methods.random_tokens import RandomTokens
    from dynbert.methods.topk import TopK

    every = list(range(layers))
    methods = {}
    for ranks in ("relative", "absolute"):
        methods[f"gates-{ranks}"] = Gates(every, length, layers, ranks=ranks)
        with torch.no_grad():
            methods[f"gates-{ranks}"].gates.raw.copy_((torch.rand(layers, length) < 0.6).float())
    methods["gates-cls"] = Gates([1, 2], length, layers, score="cls_attention", ranks="absolute")
    with torch.no_grad():
        methods["gates-cls"].gates.raw.copy_((torch.arange(length) < 12).float().expand(2, length))
    for ranks in ("relative", "absolute"):
        methods[f"power_bert-{ranks}"] = PowerBert(every, length, ranks=ranks)
        methods[f"power_bert-{ranks}"].retention.copy_(torch.tensor([30, 20, 9, 4]))
    methods["ltp"] = LearnedTokenPruning(every, length, layers, heads, threshold=0.1)
    methods["topk"] = TopK(every, length, layers, keep=0.4)
    methods["random"] = RandomTokens(every, length, layers, keep=0.4, seed=3)
    methods["none"] = NoPruning([], length)
    return methods


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "electra", "electra-small"])
def test_the_exported_forward_is_dynbert_hard_mode_for_every_method(family):
    from dynbert.core import GatedModel
    from dynbert.encoders import random_model
    from dynbert.export import exported_classifier

    torch.manual_seed(0)
    sizes = dict(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128, vocab_size=100, max_positions=64,
                 num_labels=3, pad_token_id=0, **({"embedding_size": 32} if family == "electra-small" else {}))
    model = random_model(family.split("-")[0], **sizes).eval()
    lengths = torch.tensor([40, 7, 23, 2, 33, 16])
    mask = (torch.arange(40) < lengths[:, None]).long()
    ids = torch.where(mask.bool(), torch.randint(5, 100, (6, 40)), 0)
    for name, method in hand_set_methods(4, 40, 4).items():
        gated = GatedModel(model, method).eval()
        exported = exported_classifier(gated)
        with torch.no_grad():
            expected = gated(ids, mask, torch.zeros_like(ids), hard=True)
            got = exported(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
        assert torch.equal(got.kept, expected.kept) and torch.equal(got.logits, expected.logits), name
        assert name == "none" or expected.kept.sum() < 4 * lengths.sum(), name  # it dropped tokens


def test_the_exported_config_names_the_labels_and_the_rule(hf_exports):
    folders, _ = hf_exports
    config = read_json(folders["topk"] / "config.json")
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["auto_map"]["AutoModelForSequenceClassification"] == \
        "modeling_dynbert.DynbertBertForSequenceClassification"
    assert config["dynbert"]["rule"] == "length_table" and config["dynbert"]["layers"] == [0, 1]
    assert read_json(folders["roberta-random"] / "config.json")["dynbert"]["rule"] == "random"


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_as_dynbert_does(runs, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")
    out = tmp_path / "onnx"
    result = invoke("export", runs["roberta-random"], "--out", out, "--format", "onnx", "--quantize", "int8")
    assert result.exit_code == 0, result.output
    assert {ONNX_FILE, ONNX_INT8_FILE, "config.json", "tokenizer.json", REPORT_FILE} <= {p.name for p in out.iterdir()}
    check = read_json(out / REPORT_FILE)["check"]
    assert check["onnxruntime"]["agreement"] >= AGREEMENT_WANTED and check["onnxruntime"]["same_kept"] == 1
    assert check["onnxruntime"]["max_abs_logit_difference"] <= 1e-3
    assert {"score", "agreement"} <= check["onnxruntime int8"].keys()
    assert "onnxruntime int8: accuracy" in result.stderr
    # The graph itself, fed by the exported tokenizer: dynamic batch and length, kept counts in the graph.
    from transformers import AutoTokenizer

    texts = dev_texts(runs["roberta-random"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    predictor = dynbert.load(runs["roberta-random"], "cpu")
    session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    assert [item.name for item in session.get_inputs()] == ["input_ids", "attention_mask"]
    for chunk in (texts[:1], texts[:5], texts):
        feed = tokenizer(chunk, truncation=True, padding=True, return_tensors="np")
        logits, kept = session.run(None, {"input_ids": feed["input_ids"], "attention_mask": feed["attention_mask"]})
        records = predictor.predict(chunk)
        assert kept.tolist() == [record["kept_per_layer"] for record in records]
        assert [predictor.spec.label_names[i] for i in logits.argmax(-1)] == [record["label"] for record in records]


@pytest.mark.parametrize("name", ["gates", "power_bert", "ltp", "topk", "electra-gates"])
def test_every_rule_exports_to_onnx_and_agrees_with_dynbert(runs, tmp_path, name):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")
    result = invoke("export", runs[name], "--out", tmp_path / "onnx", "--format", "onnx")
    assert result.exit_code == 0, result.output
    check = read_json(tmp_path / "onnx" / REPORT_FILE)["check"]["onnxruntime"]
    assert check["agreement"] >= AGREEMENT_WANTED and check["same_kept"] == 1, check
    assert check["max_abs_logit_difference"] <= 1e-3, check


def test_the_graph_ranks_and_gathers_ties_as_dynbert_stable_sort_does(tmp_path):
    """The export ranks and orders kept tokens with ONNX TopK, whose ties go to the lower index first; dynbert
    (and the eager forward) uses a stable sort. Scores here tie on purpose, and most tokens are kept."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")
    from torch.export import Dim

    from dynbert import export_modeling

    class RankAndGather(torch.nn.Module):
        def forward(self, score, present, keep):
            cls_key = torch.full((score.size(0), 1), float("inf"))
            hidden = torch.arange(score.size(1), dtype=torch.float32).expand(score.size(0), -1)[..., None]
            gathered, alive, _, count = export_modeling._gather_kept(hidden, keep, torch.zeros_like(score).long())
            return export_modeling._rank(score, present, cls_key), gathered[..., 0], alive, count

    generator = torch.Generator().manual_seed(0)
    score = torch.randint(0, 3, (6, 12), generator=generator).float()  # three values: ties everywhere
    present = torch.rand(6, 12, generator=generator) > 0.2
    keep = (torch.rand(6, 12, generator=generator) > 0.4) & present
    keep[:, 0] = True
    axes = {0: Dim("batch"), 1: Dim("sequence", max=64)}
    program = torch.onnx.export(RankAndGather(), (score, present, keep), dynamo=True,
                                input_names=["score", "present", "keep"],
                                dynamic_shapes={"score": axes, "present": axes, "keep": axes}, verbose=False)
    program.save(str(tmp_path / "rank.onnx"))
    session = ort.InferenceSession(str(tmp_path / "rank.onnx"), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"score": score.numpy(), "present": present.numpy(), "keep": keep.numpy()})
    eager = RankAndGather()(score, present, keep)
    for got, want in zip(exported, eager):
        assert got.tolist() == want.tolist()


@pytest.mark.slow
def test_serve_bench_times_dense_and_pruned_models_on_the_dev_texts(runs, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")
    result = invoke("bench", "--run", runs["gates"], "--inputs", "dev", "--runtime", "torch,onnxruntime", "--quick",
                    "--threads", "1", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / SERVE_BENCH_FILE)
    written = read_json(tmp_path / SERVE_BENCH_FILE)
    rows = {(row["model"], row["runtime"], row["batch_size"]): row for row in written["rows"]}
    models = {("dense", "torch"), ("pruned", "torch"), ("dense", "onnxruntime"), ("pruned", "onnxruntime"),
              ("pruned int8", "onnxruntime")}
    assert set(rows) == {(*model, size) for model in models for size in (1, 32)}
    assert written["inputs"]["examples"] == 32 and written["inputs"]["max_tokens"] <= written["inputs"]["max_length"]
    for (model, runtime, size), row in rows.items():
        assert row["batches"] == (32 if size == 1 else 1) and row["examples_per_second"] > 0
        if model == "dense":
            assert row["flops_ratio"] == 1 and row["speedup"] == 1
        else:
            assert row["flops_ratio"] < 1
        if model != "pruned int8":
            assert row["agreement"] == 1, (model, runtime, size)
    assert rows["pruned", "onnxruntime", 32]["flops_ratio"] == rows["pruned", "torch", 32]["flops_ratio"]
    assert [(t["batch_size"], t["target"]) for t in written["targets"]] == [(1, TARGETS[1]), (32, TARGETS[32])]
    target = written["targets"][1]
    assert target["efficiency"] == pytest.approx(target["speedup"] / target["flops_reduction"])
    assert "pruned vs dense ONNX Runtime" in result.stderr


def one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_bad_export_input_is_one_sentence_before_any_work(runs, tmp_path, monkeypatch):
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    one_line_error(invoke("export", runs["gates"], "--out", full), "not empty")
    one_line_error(invoke("export", tmp_path / "nowhere", "--out", tmp_path / "a"), "does not exist")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    one_line_error(invoke("export", unfinished, "--out", tmp_path / "b"))
    one_line_error(invoke("export", runs["gates"], "--out", tmp_path / "c", "--quantize", "int8"), "--format onnx")
    one_line_error(invoke("export", runs["gates"], "--out", tmp_path / "d", "--format", "tflite"), "hf, onnx")
    one_line_error(invoke("bench", "--inputs", "dev"), "--run")
    one_line_error(invoke("bench", "--run", runs["gates"], "--runtime", "tensorrt", "--inputs", "dev"), "torch")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    one_line_error(invoke("export", runs["gates"], "--out", tmp_path / "e", "--format", "onnx"),
                   "onnxruntime", "pip install -e '.[onnx]'")
    one_line_error(invoke("bench", "--run", runs["gates"], "--inputs", "dev", "--runtime", "onnxruntime",
                          "--out", tmp_path), "pip install -e '.[onnx]'")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["full", "unfinished"]
