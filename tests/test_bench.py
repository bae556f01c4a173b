"""dynbert bench (inference) and dynbert bench --train on tiny models: what is written, FLOPs
bookkeeping, schedules, models and runs, bad input. No timing assertions."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import dynbert.bench as bench
import dynbert.loop
import dynbert.train_bench as train_bench
from dynbert.bench import BENCH_FILE, run_bench, schedule_method
from dynbert.core import GatedModel, TokenPruner
from dynbert.encoders import supported_model_types
from dynbert.errors import DynbertError
from dynbert.measure import result_path
from dynbert.methods import registered
from dynbert.train_bench import SETTINGS, TRAIN_BENCH_FILE

from helpers import FAST, SYNTHETIC, gated_bert, invoke, read_json

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
            max_position_embeddings=128)
ROW_KEYS = {"schedule", "mode", "score", "batch_size", "seq_len", "kept_fraction", "kept_per_layer",
            "flops_ratio_analytic", "flops_ratio_measured", "seconds_median", "seconds_min", "speedup", "efficiency"}
ONE_ROUND = dict(repeats=1, warmup=0, threads=1, device="cpu")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_bench(quick=True, model_config=TINY, threads=1, device="cpu", out=out)
    return out, result


def _rows(result, **match):
    return [row for row in result["rows"] if all(row[key] == value for key, value in match.items())]


def test_writes_bench_json_with_every_row(quick):
    out, result = quick
    written = json.loads((out / BENCH_FILE).read_text())
    assert written == json.loads(json.dumps(result))
    assert written["threads"] == 1 and written["dtype"] == "fp32"
    assert written["machine"]["device"] == "cpu" and "device_name" in written["machine"]
    expected = dict(source="bert", model_type="bert", hidden_size=64, num_hidden_layers=2, pruned_layers=[0, 1])
    assert {key: written["model"][key] for key in expected} == expected
    for row in written["rows"]:
        assert ROW_KEYS <= row.keys()
    schedules = {row["schedule"] for row in written["rows"]}
    assert schedules == {"plain", "full", "keep70", "keep50", "keep30", "keep10", "power"}
    assert {(row["batch_size"], row["seq_len"]) for row in written["rows"]} == {(1, 64), (8, 64)}


def test_gathered_flops_match_the_counter(quick):
    _, result = quick
    gather = _rows(result, mode="gather")
    assert len(gather) == 2 * 7
    for row in gather:
        assert row["flops_ratio_measured"] == pytest.approx(row["flops_ratio_analytic"], rel=0.01), row


def test_schedules_keep_what_they_say(quick):
    _, result = quick

    def kept(schedule):
        return _rows(result, schedule=schedule, mode="gather", batch_size=1, score="attention_received")[0]

    assert kept("full")["kept_per_layer"] == [64, 64] and kept("full")["flops_ratio_analytic"] == pytest.approx(1.0)
    for fraction in (70, 50, 30, 10):  # the first pruned layer prunes, the next keeps what remains
        assert kept(f"keep{fraction}")["kept_per_layer"] == [math.ceil(fraction / 100 * 64)] * 2
    assert kept("power")["kept_per_layer"] == [math.ceil(0.15 ** 0.5 * 64), math.ceil(0.15 * 64)]
    ratios = [kept(name)["flops_ratio_analytic"] for name in ("full", "keep70", "keep50", "keep30", "keep10")]
    assert ratios == sorted(ratios, reverse=True) and len(set(ratios)) == 5


def test_mask_rows_share_the_analytic_ratio_but_save_nothing(quick):
    _, result = quick
    for mask in _rows(result, mode="mask"):
        gather = _rows(result, mode="gather", schedule=mask["schedule"], score=mask["score"],
                       batch_size=mask["batch_size"], seq_len=mask["seq_len"])[0]
        assert mask["flops_ratio_analytic"] == gather["flops_ratio_analytic"]
        assert mask["kept_per_layer"] == gather["kept_per_layer"]
        assert mask["flops_ratio_measured"] == pytest.approx(1.0, rel=0.01)


def test_keep50_is_also_benched_with_cls_attention(quick):
    _, result = quick
    assert {row["score"] for row in _rows(result, schedule="keep50")} == {"attention_received", "cls_attention"}
    assert {row["score"] for row in _rows(result, schedule="keep30")} == {"attention_received"}


def test_keep_counts_and_schedule_method():
    def keep_counts(schedule, layers, num_layers, seq_len):  # tokens each pruned layer keeps of seq_len
        return schedule_method(schedule, layers, num_layers, 32, "attention_received").counts[:, seq_len].tolist()

    assert keep_counts("keep50", [0, 1], 2, 31) == [16, 31]
    assert keep_counts("power", [1, 3], 4, 20) == [math.ceil(0.15 ** 0.5 * 20), 3]
    assert keep_counts("full", [0, 1, 2], 3, 9) == [9, 9, 9]
    method = schedule_method("keep30", [0, 1], 2, max_length=32, score="cls_attention")
    assert method.score == "cls_attention" and method.name == "schedule"
    assert method.counts[:, 20].tolist() == [6, 20]  # a 20-token input: the first layer keeps ⌈0.3·20⌉


# ---------------------------------------------------------------------------------------------
# Runs: the learned row is the run's own method, whatever it is


def _tiny_bert(seed=0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(num_labels=2, **TINY))


def _check_learned(result, run: GatedModel, expected_kept: list[int]) -> None:
    learned = _rows(result, schedule="learned", mode="gather")[0]
    assert learned["kept_per_layer"] == expected_kept
    assert learned["score"] == run.method.score
    assert learned["flops_ratio_measured"] == pytest.approx(learned["flops_ratio_analytic"], rel=0.01)
    assert result["model"]["method"] == run.method.name and result["model"]["source"] == "run"
    # Fixed schedules ran on the run's weights and pruned layers.
    keep50 = _rows(result, schedule="keep50", mode="gather", score=run.method.score)[0]
    assert keep50["kept_per_layer"][0] == 16


def _unchanged(model: GatedModel, before: dict) -> bool:
    after = model.state_dict()
    return all(torch.equal(after[name], tensor) for name, tensor in before.items())


def test_learned_schedule_of_a_gates_run_leaves_the_run_as_found(tmp_path):
    run = gated_bert(_tiny_bert(), max_length=32, score="cls_attention")
    with torch.no_grad():
        run.method.gates.raw[0, 8:] = 0.0  # layer 0 keeps 8 of 32 ranks
        run.method.gates.raw[1, 4:] = 0.3  # layer 1 keeps 4
    run.train()
    before = {name: tensor.clone() for name, tensor in run.state_dict().items()}
    result = run_bench(quick=True, run=run, schedules=["keep50", "learned"], batch_sizes=[2], seq_lens=[32],
                       out=tmp_path, **ONE_ROUND)
    _check_learned(result, run, [8, 4])
    assert _unchanged(run, before) and run.training and run.method.score == "cls_attention"
    assert run.model.config._attn_implementation == "dynbert"
    assert next(run.parameters()).dtype == torch.float32


class KeepFirstTokens(TokenPruner):
    """A method that is not gates: pruned layer l keeps the first keep[l] tokens of the input."""

    name = "keep_first"

    def __init__(self, layers, max_length, keep):
        super().__init__(layers, max_length)
        self.keep = keep

    def keep_weights(self, state, row, tokens, hard):
        return (tokens.positions < self.keep[row]).float()


def test_learned_schedule_of_another_method_runs_that_method(tmp_path):
    run = GatedModel(_tiny_bert(), KeepFirstTokens([0, 1], 32, keep=[20, 5]))
    result = run_bench(quick=True, run=run, batch_sizes=[2], seq_lens=[32], out=tmp_path, **ONE_ROUND)
    _check_learned(result, run, [20, 5])
    assert {row["schedule"] for row in result["rows"]} == {"plain", *bench.DEFAULT_SCHEDULES, "learned"}


def test_a_run_without_pruning_is_refused(tmp_path):
    ungated = GatedModel(_tiny_bert(), registered("none")([], 32))
    with pytest.raises(DynbertError, match="prunes no layer"):
        run_bench(quick=True, run=ungated, out=tmp_path)


# ---------------------------------------------------------------------------------------------
# Models: any family with an encoder adapter, or a checkpoint folder's config


@pytest.mark.parametrize("family", supported_model_types())
def test_every_family_is_benched_through_its_adapter(tmp_path, family):
    result = run_bench(model=family, model_config=TINY, schedules=["keep50"], batch_sizes=[2], seq_lens=[16],
                       out=tmp_path, **ONE_ROUND)
    assert result["model"]["model_type"] == family and result["model"]["hidden_size"] == 64
    for row in _rows(result, mode="gather"):
        assert row["flops_ratio_measured"] == pytest.approx(row["flops_ratio_analytic"], rel=0.01), row


def test_a_checkpoint_folder_is_benched_at_its_config(tmp_path):
    BertConfig(num_labels=3, **{**TINY, "hidden_size": 96, "num_attention_heads": 3}).save_pretrained(tmp_path / "ckpt")
    result = run_bench(model=tmp_path / "ckpt", schedules=["full"], batch_sizes=[1], seq_lens=[8],
                       out=tmp_path / "out", **ONE_ROUND)
    assert result["model"]["hidden_size"] == 96 and result["model"]["num_hidden_layers"] == 2
    assert result["model"]["source"] == str(tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------------
# Bad input: one sentence, before any work


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="fp16", device="cpu"), "--dtype fp16 needs a CUDA GPU"),
    (dict(device="cuda"), "--device cuda but no CUDA GPU"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(dtype="int8"), "unknown dtype 'int8'"),
    (dict(model="gpt9"), "--model gpt9 is neither a model family"),
    (dict(model_config={"hidden_sise": 8}), "hidden_sise is not a size"),
    (dict(schedules=["learned"]), "needs a trained run"),
    (dict(schedules=["keep45"]), "unknown schedule"),
    (dict(batch_sizes=[0]), "at least 1"),
    (dict(run="outputs/some-run", model="bert"), "either a run or a model"),
])
def test_mistakes_are_one_sentence_before_any_work(tmp_path, monkeypatch, kwargs, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "_models", _no_work)
    with pytest.raises(DynbertError, match=message):
        run_bench(quick=True, out=tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def _no_work(*args, **kwargs):
    raise AssertionError("work began before the input was checked")


def test_lengths_past_the_models_positions_are_refused_before_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_bench", _no_work)
    with pytest.raises(DynbertError, match=r"\[256\] exceed the model's 128 positions"):
        run_bench(model_config=TINY, seq_lens=[256], out=tmp_path, device="cpu")


def test_a_folder_of_another_family_or_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DynbertError, match="holds no config.json"):
        run_bench(model=tmp_path / "empty", out=tmp_path / "out")
    from transformers import GPT2Config

    GPT2Config().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(DynbertError, match="is a 'gpt2' model"):
        run_bench(model=tmp_path / "gpt2", out=tmp_path / "out")


@pytest.mark.parametrize("args, message", [
    (["--dtype", "fp16", "--device", "cpu"], "--dtype fp16 needs a CUDA GPU"),
    (["--device", "cuda"], "--device cuda but no CUDA GPU"),
    (["--model", "gpt9"], "--model gpt9 is neither a model family"),
    (["--out", "{tmp}/a_file"], "--out {tmp}/a_file is a file"),
    (["--data", "{tmp}"], "--data is for --train"),
    (["--train", "--dtype", "bf16"], "drop --run, --dtype"),
    (["--train", "--batch-size", "32"], "drop --run, --dtype, --batch-size and --schedule"),
    (["--train", "--device", "cuda"], "--device cuda but no CUDA GPU"),
    (["--train", "--model", "bert"], "--train --model bert is not a folder"),
    (["--train", "--data", "{tmp}/SST-3"], "is not a folder"),
    (["--train", "--data", "{tmp}"], "is not one of GLUE's task folders"),
    (["--train", "--out", "{tmp}/a_file"], "--out {tmp}/a_file is a file"),
])
def test_cli_mistakes_are_one_line_and_write_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "_models", _no_work)
    monkeypatch.setattr(train_bench, "_bench", _no_work)
    (tmp_path / "a_file").write_text("not a folder")
    args = [arg.format(tmp=tmp_path) for arg in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    result = invoke("bench", "--quick", *args, *out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(tmp=tmp_path) in lines[0]
    assert not (tmp_path / "out").exists()


def test_out_path_rule(tmp_path):
    assert result_path(tmp_path, BENCH_FILE) == tmp_path / BENCH_FILE
    assert result_path(tmp_path, TRAIN_BENCH_FILE) == tmp_path / TRAIN_BENCH_FILE
    assert result_path(tmp_path / "b.json", BENCH_FILE) == tmp_path / "b.json"


# ---------------------------------------------------------------------------------------------
# The training bench


def test_train_bench_times_the_loops_own_step_in_four_settings(tmp_path, monkeypatch):
    steps = []
    real_step = dynbert.loop.train_step
    assert train_bench.train_step is real_step  # the loop's step, not a copy

    def counted(model, gated, *args):
        steps.append(type(gated).__name__)
        return real_step(model, gated, *args)

    monkeypatch.setattr(train_bench, "train_step", counted)
    monkeypatch.setattr(train_bench, "QUICK", dict(steps=2, rounds=2, warmup=1))  # the shape of quick, fewer steps
    result = invoke("bench", "--train", "--quick", "--device", "cpu", "--threads", "1", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / TRAIN_BENCH_FILE)
    written = read_json(tmp_path / TRAIN_BENCH_FILE)

    assert [row["setting"] for row in written["rows"]] == [s.name for s in SETTINGS]
    assert [row["setting"] for row in written["rows"]] == ["plain", "gated", "gated+grouped", "gated+grouped+bf16"]
    per_setting = written["warmup_steps"] + written["rounds"] * written["steps"]
    assert steps == ["PlainClassifier"] * per_setting + ["GatedModel"] * 3 * per_setting
    assert written["examples"] == written["steps"] * written["batch_size"]
    tokens_per_example = written["real_tokens"] / written["examples"]
    assert 2 < tokens_per_example <= written["max_length"]
    for row in written["rows"]:
        assert {"setting", "examples_per_second", "tokens_per_second", "ratio_to_plain"} <= row.keys()
        assert 0 < row["examples_per_second"] < math.inf and len(row["round_seconds"]) == written["rounds"]
        assert row["tokens_per_second"] == pytest.approx(row["examples_per_second"] * tokens_per_example)
    padding = {row["setting"]: row["padding_fraction"] for row in written["rows"]}
    # The same examples in both orders: grouping by length pads less.
    assert padding["plain"] == padding["gated"] > padding["gated+grouped"] == padding["gated+grouped+bf16"]
    assert [(t["setting"], t["versus"]) for t in written["targets"]] == [
        ("gated", "plain"), ("gated+grouped", "gated"), ("gated+grouped+bf16", "gated+grouped"),
        ("gated+grouped+bf16", "plain")]


def test_bench_run_folder_from_the_command_line(tmp_path):
    assert invoke("train", *FAST, *SYNTHETIC, f"output_dir={tmp_path / 'run'}").exit_code == 0
    result = invoke("bench", "--quick", "--device", "cpu", "--threads", "1", "--run", tmp_path / "run",
                    "--batch-size", "4", "--schedule", "full", "--schedule", "learned", "--out", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    written = read_json(tmp_path / "b.json")
    assert written["model"]["source"] == str(tmp_path / "run") and written["model"]["method"] == "gates"
    assert {row["seq_len"] for row in written["rows"]} == {48}  # the run's max_length: shorter than quick's 64
    assert {row["batch_size"] for row in written["rows"]} == {4}  # as asked, not quick's 1 and 8
    assert {row["schedule"] for row in written["rows"]} == {"plain", "full", "learned"}  # plain: the reference
    assert _rows(written, schedule="learned")
