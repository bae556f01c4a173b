"""The peer methods (PoWER-BERT, LTP, top-k, random) beside the paper's gates: each trains through
the CLI and reloads, decides the same tokens in soft and gathered mode once its decisions are 0/1,
costs what the FLOPs formula says, and does what its paper's stages say. ToMe, which merges tokens
instead of dropping them, shares the engine tests here (tests/test_tome.py has the rest).

The engine tests use test_core's tiny random BERT (hidden 32, 3 layers, 2 heads, length <= 16).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from transformers import AutoTokenizer

from dynbert.config import compose_config
from dynbert.core import GatedModel, count_matmul_flops, flops_per_example
from dynbert.data import encode, load_splits
from dynbert.declarations import method_knob
from dynbert.errors import DynbertError
from dynbert.evaluate import predict
from dynbert.methods.ltp import FINE_TUNE, HARD, SOFT, LearnedTokenPruning
from dynbert.methods.power_bert import PowerBert, retention_from
from dynbert.methods.random_tokens import RandomTokens, token_hash
from dynbert.methods.tome import TokenMerging, matching_macs
from dynbert.methods.topk import TopK, keep_counts, keep_fractions
from dynbert.rundir import load_run_config
from dynbert.tasks import compute_metrics, get_task
from dynbert.train import load_run, train

from helpers import CONTRACT_KEYS, FAST, SYNTHETIC, comparable, invoke, read_json, train_stopping_at
from test_core import DIMS, HEADS, LAYERS, LENGTHS, MAX_LENGTH, make_batch, make_bert

PEERS = ("power_bert", "ltp", "topk", "random")
MERGING = ("tome",)
"""Methods that merge tokens in the engine's reduce step instead of dropping them."""
# Settings under which a 4-step smoke run really prunes, so reloading it proves something:
# PoWER-BERT's weights take one big search step; LTP's thresholds start well above 1/length.
PRUNING = {"gates": ["method.start=0", "method.lr=0.5", "lambda=1"],
           "power_bert": ["method.lr=0.5", "lambda=1", "method.ranks=relative"],
           "ltp": ["method.threshold=0.2"],
           "topk": ["method.keep=0.3"],
           "random": ["method.keep=0.3"]}
KNOBS = {"gates": ("lambda", 1.0), "power_bert": ("lambda", 1.0), "ltp": ("lambda", 0.1),
         "topk": ("method.keep", 0.3), "random": ("method.keep", 0.3), "tome": ("method.keep", 0.3)}


def peer(name: str, seed: int = 0, model=None, layers=None) -> GatedModel:
    """A tiny BERT pruned by ``name`` with its decisions already 0/1, and pruning on LENGTHS's inputs."""
    layers = list(range(LAYERS)) if layers is None else layers
    model = make_bert(seed=seed) if model is None else model
    if name == "power_bert":
        method = PowerBert(layers, MAX_LENGTH)
        with torch.no_grad():  # weights around 0.5: k_l near half the ranks, then fixed
            generator = torch.Generator().manual_seed(seed)
            method.retention_weights.raw.copy_(torch.rand(method.retention_weights.raw.shape, generator=generator))
        method.harden_()
    elif name == "ltp":
        # s is about 1/length: thresholds 0.033, 0.067, 0.1 drop part of every input but the shortest.
        method = LearnedTokenPruning(layers, MAX_LENGTH, LAYERS, HEADS, threshold=0.1)
        method.harden_()
    elif name == "topk":
        method = TopK(layers, MAX_LENGTH, LAYERS, keep=0.4)
    elif name == "tome":
        method = TokenMerging(layers, MAX_LENGTH, LAYERS, keep=0.4)
    else:
        method = RandomTokens(layers, MAX_LENGTH, LAYERS, keep=0.4, seed=seed)
    return GatedModel(model, method).eval()


# ---------------------------------------------------------------------------------------------
# 1. Every method trains through the CLI, writes a complete run folder, and reloads as it ran


def _evaluate_reloaded(run_dir, hard: bool) -> dict:
    cfg = load_run_config(run_dir)
    spec = get_task(cfg.task.name)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    data = encode(load_splits(cfg, spec)[spec.eval_splits[0]], tokenizer, cfg.task.max_length, spec)
    result = predict(load_run(run_dir), data, cfg.train.eval_batch_size, hard, spec)
    result["score"] = compute_metrics(spec, result["predictions"].tolist(), data.labels.tolist())[spec.main_metric]
    return result


@pytest.mark.parametrize("name", ["gates", *PEERS])
def test_each_method_trains_and_reloads_with_the_same_hard_predictions(tmp_path, name):
    run_dir = tmp_path / name
    result = invoke("train", *FAST, *SYNTHETIC, f"method={name}", *PRUNING[name], f"output_dir={run_dir}")
    assert result.exit_code == 0, result.output
    knob, value = KNOBS[name]
    label = {"lambda": "λ", "method.keep": "keep"}[knob]
    assert f"synthetic {name} {label}={value:g}:" in result.stderr

    metrics = read_json(run_dir / "metrics.json")
    assert CONTRACT_KEYS <= set(metrics)
    assert metrics["method"] == name and metrics["knob"] == knob and metrics["knob_value"] == value
    assert metrics["flops_ratio"] < 1, "the run pruned nothing: reloading it would prove little"
    assert metrics["decided"] == 1.0 or name == "gates", "the peers' trained decisions are exactly 0/1"
    assert {"config.json", "model.safetensors", "method.safetensors", "tokenizer.json"} <= {
        path.name for path in (run_dir / "model").iterdir()}
    assert not (run_dir / "checkpoint.pt").exists()

    hard = _evaluate_reloaded(run_dir, hard=True)
    assert hard["score"] == metrics["score"]
    assert hard["flops"].mean().item() == pytest.approx(metrics["flops_per_example"], rel=1e-12)
    assert hard["kept"].mean(dim=0).tolist() == pytest.approx(metrics["kept_per_layer"], rel=1e-12)
    # A reloaded model's decisions are 0/1: soft mode computes what the gathered model does.
    soft = _evaluate_reloaded(run_dir, hard=False)
    assert torch.equal(soft["predictions"], hard["predictions"])


# ---------------------------------------------------------------------------------------------
# 2. With 0/1 decisions, soft mode is the gathered model


@pytest.mark.parametrize("name", [*PEERS, *MERGING])
def test_hard_decisions_soft_equals_gathered_on_a_padded_mixed_length_batch(name):
    input_ids, attention_mask = make_batch(seed=3, width=15)
    pads = ~attention_mask.bool()
    pruned_somewhere = False
    for seed in range(3):
        gated = peer(name, seed=seed)
        with torch.no_grad():
            soft = gated(input_ids, attention_mask, hard=False)
            hard = gated(input_ids, attention_mask, hard=True)
        assert (soft.logits - hard.logits).abs().max() <= 1e-4, f"seed {seed}"
        assert torch.equal(soft.kept, hard.kept) and torch.equal(soft.present, hard.present), f"seed {seed}"
        assert hard.present[:, :, 0].all(), "CLS was dropped"
        assert not (hard.present & pads[:, None, :]).any(), "a pad was kept"
        assert (hard.kept[:, 1:] <= hard.kept[:, :-1]).all()
        pruned_somewhere |= bool((hard.kept < hard.num_tokens[:, None]).any())
    assert pruned_somewhere, "no token was ever dropped: the test proves nothing"


@pytest.mark.parametrize("name", [*PEERS, *MERGING])
def test_an_example_alone_keeps_what_it_keeps_in_a_padded_batch(name):
    """Decisions depend on the input, not on its batch: LTP's score is a mean over the input's own
    present queries (their code divides by the padded length), top-k counts the input's own tokens."""
    gated = peer(name, seed=4)
    input_ids, attention_mask = make_batch(seed=4, width=16)
    with torch.no_grad():
        together = gated(input_ids, attention_mask, hard=True)
        for row, n in enumerate(LENGTHS):
            alone = gated(input_ids[row:row + 1, :n], attention_mask[row:row + 1, :n], hard=True)
            assert torch.equal(alone.present[0], together.present[row, :, :n]), f"row {row}"
            assert (alone.logits[0] - together.logits[row]).abs().max() <= 1e-5, f"row {row}"


# ---------------------------------------------------------------------------------------------
# 3. Analytic FLOPs agree with torch's counter


@pytest.mark.parametrize("layers", [None, [1]])
@pytest.mark.parametrize("name", [*PEERS, *MERGING])
def test_analytic_flops_match_counter(name, layers):
    gated = peer(name, seed=9, layers=layers)
    input_ids, attention_mask = make_batch(lengths=(13,), seed=9)
    with torch.no_grad():
        out = gated(input_ids, attention_mask, hard=True)
    assert out.kept[0, -1] < 13, "nothing pruned: the check would only repeat the baseline's"
    analytic = flops_per_example(out.num_tokens, out.kept, DIMS)
    if name in MERGING:  # plus ToMe's similarity product, which the engine's count leaves out (docs/methods.md)
        entering = torch.cat([out.num_tokens[:, None], out.kept[:, :-1]], dim=1)[:, gated.method.layers]
        analytic = analytic + 2 * matching_macs(entering, DIMS.hidden).sum(dim=1)
    counted = count_matmul_flops(gated, input_ids, attention_mask, hard=True)
    assert abs(float(analytic[0]) - counted) / counted <= 0.01, f"analytic {float(analytic[0])}, counted {counted}"


# ---------------------------------------------------------------------------------------------
# 4. Top-k and random


@pytest.mark.parametrize("name", ["topk", "random", "tome"])
def test_keeping_everything_is_plain_bert(name):
    model = make_bert(seed=5)
    reference = copy.deepcopy(model)
    cls = {"topk": TopK, "random": RandomTokens, "tome": TokenMerging}[name]
    extra = {"seed": 0} if name == "random" else {}
    gated = GatedModel(model, cls(list(range(LAYERS)), MAX_LENGTH, LAYERS, keep=1.0, **extra)).eval()
    input_ids, attention_mask = make_batch(seed=5)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        for hard in (False, True):
            out = gated(input_ids, attention_mask, hard=hard)
            assert (out.logits - expected).abs().max() <= 1e-5, f"hard={hard}"
            assert torch.equal(out.kept, attention_mask.sum(1, keepdim=True).expand(-1, LAYERS))


def test_the_keep_schedule_falls_linearly_to_keep_at_the_last_layer():
    assert keep_fractions([0, 1, 2, 3], 4, 0.2) == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert keep_fractions([3], 4, 0.5) == pytest.approx([0.5])  # a layer subset keeps its own fraction
    # ⌈f·n⌉ with CLS counted, at least CLS; 0.7·10 is 7 tokens, not ⌈7.000000000000001⌉ = 8.
    assert keep_counts(0.7, 12)[[10, 1, 3]].tolist() == [7, 1, 3]
    assert keep_counts(0.01, 12)[12].item() == 1
    assert keep_counts(0.5, 4).tolist() == [1, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="keep=1.5"):
        keep_fractions([0], 2, 1.5)
    # A keep solved for a FLOPs target may fall below 0: those layers keep CLS alone.
    assert keep_fractions([0, 1], 2, -1.0) == pytest.approx([0.0, -1.0])
    assert keep_counts(-1.0, 4).tolist() == [1, 1, 1, 1, 1]

    gated = peer("topk")  # keep 0.4 over 3 layers: 0.8, 0.6, 0.4 of each input
    input_ids, attention_mask = make_batch(seed=6)
    with torch.no_grad():
        out = gated(input_ids, attention_mask, hard=True)
    n = torch.tensor(LENGTHS, dtype=torch.float64)
    expected = torch.stack([torch.ceil(n * f - 1e-6) for f in (0.8, 0.6, 0.4)], dim=1).long()
    assert torch.equal(out.kept, expected)


def test_topk_keeps_the_most_attended_tokens():
    gated = peer("topk", seed=7)
    input_ids, attention_mask = make_batch(lengths=(12,), seed=7)
    scores = []
    real_rank = gated.method.ranking

    def recording(row, tokens):
        scores.append((tokens.score.clone(), tokens.positions.clone()))
        return real_rank(row, tokens)

    gated.method.ranking = recording
    with torch.no_grad():
        out = gated(input_ids, attention_mask, hard=True)
    score, positions = scores[0]  # layer 0: every token present
    kept = out.present[0, 0]
    k = int(kept.sum())
    top = set(positions[0, 1:][score[0, 1:].argsort(descending=True)[: k - 1]].tolist())
    assert set(kept.nonzero().flatten().tolist()) == {0} | top


def test_random_is_repeatable_in_evaluation_and_fresh_in_training():
    input_ids, attention_mask = make_batch(seed=8)
    gated = peer("random", seed=0)
    with torch.no_grad():
        first = gated(input_ids, attention_mask, hard=True).present
        assert torch.equal(gated(input_ids, attention_mask, hard=True).present, first)
        other_seed = peer("random", seed=1, model=make_bert(seed=0))
        assert not torch.equal(other_seed(input_ids, attention_mask, hard=True).present, first), \
            "another seed must drop other tokens"
        gated.train()
        draws = {tuple(gated(input_ids, attention_mask).present.flatten().tolist()) for _ in range(4)}
    assert len(draws) > 1, "training draws fresh random tokens each step"
    # The hash depends on what identifies a token, not on where gathering has moved it.
    positions, ids = torch.tensor([[0, 5, 9]]), torch.tensor([[1, 40, 41]])
    assert torch.equal(token_hash(3, 1, positions, ids)[:, 1:], token_hash(3, 1, positions[:, 1:], ids[:, 1:]))


# ---------------------------------------------------------------------------------------------
# 5. PoWER-BERT: search, fix the retention, retrain


def test_retention_is_the_summed_weights_truncated_and_never_grows():
    """Their get_configuration: int(np.sum(W)), then no layer keeps more than the one before."""
    method = PowerBert([0, 1, 2], max_length=16, start=0.3, retrain_at=0.65)
    with torch.no_grad():
        raw = method.retention_weights.raw
        raw.fill_(0.0)
        raw[0, :10] = 0.96  # CLS's weight stays 1: Σ = 1 + 9·0.96 = 9.64 -> 9
        raw[1, :7] = 0.9    # 1 + 6·0.9 = 6.4 -> 6
        raw[2, :12] = 0.8   # 1 + 11·0.8 = 9.8 -> 9, more than layer 1: held at 6
    sums = method.retention_weights().sum(dim=1)
    assert sums.tolist() == pytest.approx([9.64, 6.4, 9.8])
    assert retention_from(method.retention_weights()).tolist() == [9, 6, 6]
    assert not method.retention_fixed and method.current_retention().tolist() == [9, 6, 6]
    assert retention_from(torch.ones(2, 16)).tolist() == [16, 16], "weights at 1 keep every rank"

    method.begin_step(6, 10)  # still searching (retrain_at 0.65)
    assert not method.retention_fixed
    method.begin_step(7, 10)  # retraining begins: k_l fixed once
    assert method.retention.tolist() == [9, 6, 6]
    with torch.no_grad():
        method.retention_weights.raw.fill_(1.0)
    method.begin_step(8, 10)
    assert method.retention.tolist() == [9, 6, 6], "a fixed retention is never recomputed"
    assert method.regularizer(None, 1.0, 8, 10) is None, "no L1 pull once the retention is fixed"
    # It travels with the method's state (checkpoints, method.safetensors).
    fresh = PowerBert([0, 1, 2], max_length=16)
    fresh.load_state_dict(method.state_dict())
    assert fresh.retention_fixed and fresh.retention.tolist() == [9, 6, 6]


def test_power_bert_stages_the_lr_and_the_l1_pull():
    method = PowerBert([0, 2], max_length=8, start=0.3, retrain_at=0.65)
    (group,) = method.param_groups()
    assert [group["schedule"](step, 10) for step in range(10)] == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    assert method.regularizer(None, 0.5, 2, 10) is None  # fine-tuning: weights frozen at 1, no pull
    parts = method.regularizer(None, 0.5, 3, 10)
    # λ · Σ_l l · Σ_j W_lj with l 1-based (layers 0 and 2 -> 1 and 3) and every weight at 1.
    assert parts.sparsity.item() == pytest.approx(0.5 * (1 * 8 + 3 * 8))
    parts.sparsity.backward()
    grad = method.retention_weights.raw.grad
    assert grad[0, 1:].tolist() == pytest.approx([0.5] * 7) and grad[1, 1:].tolist() == pytest.approx([1.5] * 7)


def test_power_bert_warns_when_its_search_is_too_short_for_the_weights_to_fall():
    """RTE's 79 search steps at the default lr 3e-3 left every weight above 0.61 and cut nothing:
    a user must hear that before training, with the lr that would reach."""
    short = PowerBert([0, 1], max_length=8, lr=3e-3).schedule_warning(234)  # RTE: 3 epochs of 78 steps
    assert short.startswith("the search has 79 optimizer step(s) at method.lr=0.003")
    assert "about 0.24" in short and "raise method.lr to about 1/79 = 0.013" in short
    assert "and lower lambda with it" in short  # a larger lr at the same lambda collapsed RTE to CLS
    assert PowerBert([0, 1], max_length=8, lr=3e-3).schedule_warning(750) is None  # SST-2: 255 steps, 0.77
    assert PowerBert([0, 1], max_length=8, lr=0.03).schedule_warning(234) is None
    empty = PowerBert([0, 1], max_length=8, start=0.5, retrain_at=0.6).schedule_warning(1)
    assert "holds none of the run's 1 optimizer step(s)" in empty


@pytest.mark.slow
def test_power_bert_retention_survives_a_kill_and_resume(tmp_path):
    args = [*FAST, *SYNTHETIC, "method=power_bert", "method.lr=0.5", "lambda=1", "train.max_steps=8",
            "train.checkpoint_every=1"]
    straight = invoke("train", *args, f"output_dir={tmp_path / 'straight'}")
    assert straight.exit_code == 0, straight.output
    # Retraining begins with step index 6 (0.67 · 8 = 5.36), which fixes k_l: the checkpoint saved
    # after 7 steps holds it. Killed right after that checkpoint, the run resumes in retraining.
    killed = train_stopping_at(7, "KILL", *args, f"output_dir={tmp_path / 'resumed'}")
    assert killed.returncode == 137, killed.stderr
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert (state["model"]["method.retention"] > 0).all()
    resumed = invoke("train", *args, f"output_dir={tmp_path / 'resumed'}")
    assert resumed.exit_code == 0, resumed.output
    expected = load_run(tmp_path / "straight").method.retention
    assert torch.equal(load_run(tmp_path / "resumed").method.retention, expected)
    assert torch.equal(state["model"]["method.retention"], expected)
    assert comparable(read_json(tmp_path / "resumed" / "metrics.json")) == \
        comparable(read_json(tmp_path / "straight" / "metrics.json"))


# ---------------------------------------------------------------------------------------------
# 6. LTP: thresholds learn under λ, then freeze


def test_ltp_regularizer_raises_the_thresholds_and_counts_real_tokens_only():
    gated = peer("ltp", seed=10)
    method = gated.method
    method.stage.fill_(SOFT)
    method.temperature = 0.05  # a soft mask with gradient at every token
    input_ids, attention_mask = make_batch(seed=10)
    out = gated(input_ids, attention_mask, hard=False)
    parts = method.regularizer(out, 1.0, 0, 10)
    real = attention_mask.bool()
    expected = sum(out.keep_weights[:, layer][real].mean() for layer in range(LAYERS))
    assert parts.sparsity.item() == pytest.approx(expected.item())
    parts.total.backward()
    assert (method.offsets.grad < 0).all(), "descent must raise every threshold (keep fewer tokens)"
    method.stage.fill_(HARD)
    assert method.regularizer(out, 1.0, 0, 10) is None


def test_ltp_stages_follow_start_and_freeze_at():
    method = LearnedTokenPruning([0, 1], max_length=8, num_layers=2, num_heads=2, start=0.2, freeze_at=0.6)
    stages = []
    for step in range(10):
        method.begin_step(step, 10)
        stages.append(int(method.stage))
    assert stages == [FINE_TUNE] * 2 + [SOFT] * 4 + [HARD] * 4
    (group,) = method.param_groups()
    assert [group["schedule"](step, 10) for step in range(10)] == pytest.approx(
        [0, 0, 1, 0.75, 0.5, 0.25, 0, 0, 0, 0])
    one_stage = LearnedTokenPruning([0], max_length=8, num_layers=2, num_heads=2, start=0.0, freeze_at=None)
    one_stage.begin_step(9, 10)
    assert int(one_stage.stage) == SOFT
    assert method.base.tolist() == pytest.approx([0.005, 0.01])  # threshold · (l + 1) / L


def test_ltp_thresholds_move_under_lambda_then_freeze(tmp_path, monkeypatch):
    """A real run: soft thresholds for 2 steps, then 2 steps of stage 2 (hard masks)."""
    import dynbert.train as train_module

    saved = {}
    real_save = train_module.save_checkpoint
    monkeypatch.setattr(train_module, "save_checkpoint", lambda path, state: (
        saved.__setitem__(state["step"], state["model"]["method.offsets"].clone()), real_save(path, state)))
    cfg = compose_config([*FAST, *SYNTHETIC, "method=ltp", "method.start=0", "method.freeze_at=0.5",
                          "method.temperature=0.05", "method.lr=0.01", "lambda=1", "train.checkpoint_every=1",
                          f"output_dir={tmp_path}"])
    metrics = train(cfg)
    assert sorted(saved) == [1, 2, 3, 4]
    assert (saved[2] > 0).all() and (saved[1] > 0).all(), "λ pulls the thresholds up"
    assert (saved[2] > saved[1]).all()
    assert torch.equal(saved[3], saved[2]) and torch.equal(saved[4], saved[2]), "stage 2 froze the thresholds"
    assert torch.equal(load_run(tmp_path).method.offsets.detach(), saved[2])
    assert metrics["decided"] == 1.0  # stage 2 trains with 0/1 masks


# ---------------------------------------------------------------------------------------------
# 7. Config: every method's keys are checked up front


@pytest.mark.parametrize("overrides, message", [
    (["method=ltp", "method.temperature=0"], "method.temperature=0 is not valid"),
    (["method=ltp", "method.freeze_at=0.2"], "method.freeze_at=0.2 is not valid: it must come after method.start=0.33"),
    (["method=power_bert", "method.retrain_at=0.3"], "method.retrain_at=0.3 is not valid"),
    (["method=topk", "method.keep=0"], "method.keep=0 is not valid"),
    (["method=random", "method.keep=1.5"], "method.keep=1.5 is not valid"),
    (["method.grid=lambda"], "method.grid=lambda is not valid"),
    (["method.grid='lamda=0,1'"], "method.grid=lamda=0,1 is not valid"),
])
def test_bad_method_values_fail_before_any_work(overrides, message):
    with pytest.raises(DynbertError, match=re.escape(message)):
        compose_config(overrides)


def test_every_method_config_composes_with_its_knob_and_grid():
    for name, (knob, _) in KNOBS.items():
        cfg = compose_config([f"method={name}"])
        assert method_knob(cfg.method).key == knob and len(cfg.method.grid) > 1, name
        assert cfg.run_name.startswith(f"{name}-{'lambda' if knob == 'lambda' else 'keep'}")
    assert compose_config(["method=ltp", "method.freeze_at=null"]).method.freeze_at is None
    assert compose_config(["method=random", "seed=7"]).method.seed == 7
    assert compose_config(["method=topk"]).output_dir == "outputs/runs/synthetic/topk-keep0.5-seed0"


def test_every_command_in_docs_methods_md_composes():
    """The commands docs/methods.md shows are configs that exist: each train command composes, each
    sweep is planned (every job's config composed) and each report command parses."""
    from pathlib import Path

    from dynbert.sweep import plan_sweep

    text = (Path(__file__).parent.parent / "docs" / "methods.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = [line.split("#")[0].split() for block in blocks for line in block.splitlines()
                if line.startswith("dynbert ")]
    kinds = {command[1] for command in commands}
    assert kinds == {"train", "sweep", "report"}, kinds
    for command in commands:
        args = [arg for arg in command[2:] if arg != "--cfg"]
        if command[1] == "train":
            compose_config(args)
        elif command[1] == "sweep":
            plan_sweep(args)
        else:
            assert invoke("report", "--help").exit_code == 0
