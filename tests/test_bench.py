"""dynbert bench on a tiny BERT: the output's shape and FLOPs bookkeeping. No timing assertions."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from dynbert.bench import BENCH_FILE, bench_json_path, run_bench, schedule_gates
from dynbert.core import GatedModel
from dynbert.errors import DynbertError
from dynbert.methods import NoPruning

from helpers import gated_bert

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
            max_position_embeddings=128)
ROW_KEYS = {"schedule", "mode", "score", "batch_size", "seq_len", "kept_fraction", "flops_ratio_analytic",
            "flops_ratio_measured", "seconds_median", "speedup", "efficiency"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_bench(quick=True, model_config=TINY, threads=1, out=out)
    return out, result


def _rows(result, **match):
    return [row for row in result["rows"] if all(row[key] == value for key, value in match.items())]


def test_writes_bench_json_with_every_key(quick):
    out, result = quick
    written = json.loads((out / BENCH_FILE).read_text())
    assert written == json.loads(json.dumps(result))
    for key in ("machine", "torch", "threads", "dtype", "rows", "train_step_overhead", "hard_full_overhead"):
        assert key in written
    assert {"platform", "processor", "cpu_count"} <= written["machine"].keys()
    assert written["threads"] == 1 and written["dtype"] == "fp32"
    assert "overhead_percent" in written["train_step_overhead"]
    assert "overhead_percent" in written["hard_full_overhead"]
    for row in written["rows"]:
        assert ROW_KEYS <= row.keys()
        assert row["seconds_median"] > 0
        assert row["efficiency"] == pytest.approx(row["speedup"] * row["flops_ratio_analytic"])
    schedules = {row["schedule"] for row in written["rows"]}
    assert schedules == {"plain", "full", "keep70", "keep50", "keep30", "keep10", "power"}
    assert {(row["batch_size"], row["seq_len"]) for row in written["rows"]} == {(1, 64), (8, 64)}


def test_gathered_flops_match_the_counter(quick):
    _, result = quick
    gather = _rows(result, mode="gather")
    assert gather
    for row in gather:
        assert row["flops_ratio_measured"] == pytest.approx(row["flops_ratio_analytic"], rel=0.01), row


def test_full_schedule_and_plain_are_the_baseline(quick):
    _, result = quick
    for row in _rows(result, schedule="full") + _rows(result, schedule="plain"):
        assert row["flops_ratio_analytic"] == pytest.approx(1.0)
        assert row["kept_fraction"] == pytest.approx(1.0)
    for row in _rows(result, schedule="plain"):
        assert row["speedup"] == pytest.approx(1.0)


def test_kept_fraction_falls_with_the_schedule(quick):
    _, result = quick
    kept = [_rows(result, schedule=name, mode="gather", batch_size=1, score="attention_received")[0]["kept_fraction"]
            for name in ("keep70", "keep50", "keep30", "keep10")]
    assert kept == sorted(kept, reverse=True) and len(set(kept)) == 4
    assert kept[0] == pytest.approx(math.ceil(0.7 * 64) / 64)  # one gated layer prunes, the rest keep all


def test_mask_rows_share_the_analytic_ratio_but_save_nothing(quick):
    _, result = quick
    for mask in _rows(result, mode="mask"):
        gather = _rows(result, mode="gather", schedule=mask["schedule"], score=mask["score"],
                       batch_size=mask["batch_size"], seq_len=mask["seq_len"])[0]
        assert mask["flops_ratio_analytic"] == gather["flops_ratio_analytic"]
        assert mask["kept_fraction"] == gather["kept_fraction"]
        assert mask["flops_ratio_measured"] == pytest.approx(1.0, rel=0.01)


def test_keep50_is_also_benched_with_cls_attention(quick):
    _, result = quick
    assert {row["score"] for row in _rows(result, schedule="keep50")} == {"attention_received", "cls_attention"}
    assert {row["score"] for row in _rows(result, schedule="keep30")} == {"attention_received"}


def _tiny_gated(score="cls_attention") -> GatedModel:
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(num_labels=2, **TINY))
    return gated_bert(bert, max_length=32, score=score)


def test_learned_schedule_uses_the_models_gates_and_leaves_it_as_found(tmp_path):
    model = _tiny_gated()
    with torch.no_grad():
        model.method.gates.raw[0, 8:] = 0.0  # layer 0 keeps 8 of 32 ranks
        model.method.gates.raw[1, 4:] = 0.3  # layer 1 keeps 4
    model.train()
    before = model.method.gates.raw.detach().clone()
    out = tmp_path / "nested" / "result.json"
    result = run_bench(quick=True, model=model, schedules=["keep70", "learned"], batch_sizes=[2], seq_lens=[32],
                       threads=1, out=out)  # keep70 first: its gates must not leak into learned's
    assert bench_json_path(out) == out and out.is_file()
    learned = _rows(result, schedule="learned", mode="gather")[0]
    assert learned["score"] == "cls_attention"
    assert learned["kept_per_layer"] == [8, 4]
    assert learned["flops_ratio_measured"] == pytest.approx(learned["flops_ratio_analytic"], rel=0.01)
    assert torch.equal(model.method.gates.raw, before)
    assert model.training and model.method.score == "cls_attention"
    assert model.model.config._attn_implementation == "dynbert"


def test_schedule_gates():
    model = _tiny_gated()
    keep50 = schedule_gates(model, "keep50", 31)
    assert keep50[0].sum() == 16 and keep50[1].sum() == 31
    power = schedule_gates(model, "power", 20)
    assert power.sum(dim=1).tolist() == [math.ceil(0.15 ** 0.5 * 20), 3]
    assert torch.equal(schedule_gates(model, "full", 32), torch.ones_like(model.method.gates.raw))


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedules=["learned"]), "needs a trained model"),
    (dict(schedules=["keep45"]), "unknown schedule"),
    (dict(dtype="fp16"), "unknown dtype"),
    (dict(seq_lens=[256]), "exceeds"),
    (dict(batch_sizes=[0]), "at least 1"),
])
def test_mistakes_are_dynbert_errors(tmp_path, kwargs, message):
    with pytest.raises(DynbertError, match=message):
        run_bench(quick=True, model_config=TINY, out=tmp_path, **kwargs)
    assert not (tmp_path / BENCH_FILE).exists()


def test_a_model_without_pruning_is_refused(tmp_path):
    torch.manual_seed(0)
    ungated = GatedModel(BertForSequenceClassification(BertConfig(num_labels=2, **TINY)), NoPruning([], 32))
    with pytest.raises(DynbertError, match="prunes no layer"):
        run_bench(quick=True, model=ungated, out=tmp_path)


def test_out_path_rule(tmp_path):
    assert bench_json_path(tmp_path) == tmp_path / BENCH_FILE
    assert bench_json_path(tmp_path / "b.json") == tmp_path / "b.json"
