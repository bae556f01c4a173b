"""ToMe (``method=tome``): tokens merged by bipartite soft matching on top-k's schedule, through the
engine's ``reduce`` hook. A merge keeps CLS, removes r tokens and averages by size; sizes add up to
the input; hard mode is a plain reference written here, and soft mode is hard mode; FLOPs agree with
torch's counter; a run trains, reloads, sweeps and reports, and export refuses it in one sentence.
(tests/test_methods.py runs ToMe through the engine tests every method shares, too.)

The engine tests use test_core's tiny random BERT (hidden 32, 3 layers, 2 heads, length <= 16).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from dynbert.config import compose_config
from dynbert.core import GatedModel, count_matmul_flops, flops_per_example
from dynbert.encoders import EncoderDims
from dynbert.errors import DynbertError
from dynbert.methods.tome import TokenMerging, bipartite_matching, matching_macs, merge_tokens
from dynbert.report import render_table
from dynbert.sweep import plan_sweep

from helpers import FAST, SYNTHETIC, invoke, read_json, run_dynbert
from test_core import DIMS, LAYERS, LENGTHS, MAX_LENGTH, make_batch, make_bert
from test_methods import _evaluate_reloaded


def tome(keep: float = 0.4, layers=None, seed: int = 0, model=None) -> GatedModel:
    layers = list(range(LAYERS)) if layers is None else layers
    model = make_bert(seed=seed) if model is None else model
    return GatedModel(model, TokenMerging(layers, MAX_LENGTH, LAYERS, keep=keep)).eval()


def recording_sizes(gated: GatedModel) -> list:
    """Wrap the method's reduce to record what each pruned layer returns: (alive, sizes)."""
    seen = []
    reduce = gated.method.reduce

    def recorded(*args, **kwargs):
        out = reduce(*args, **kwargs)
        seen.append((out[1].clone(), out[3].clone()))
        return out

    gated.method.reduce = recorded
    return seen


# ---------------------------------------------------------------------------------------------
# 1. One merge, by hand


# Six tokens, D = 2: A = {0 (CLS), 2, 4}, B = {1, 3, 5}. Token 2's nearest B token is 1 (cosine
# 0.995), token 4's is 3 (0.9986); CLS is as close to 3 but is never merged.
HAND = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [0.1, 1.0], [1.0, 1.0], [1.0, 0.9], [-1.0, 0.0]]])
HAND_SIZES = torch.tensor([[1.0, 2.0, 3.0, 1.0, 1.0, 1.0]])


def test_a_merge_keeps_cls_removes_r_tokens_and_averages_by_size():
    present = torch.ones(1, 6, dtype=torch.bool)
    one = bipartite_matching(HAND, present, torch.tensor([1]))
    assert one.merged[0].tolist() == [False, False, False, False, True, False], "the closest pair first"
    assert one.destination[0].tolist() == [0, 1, 2, 3, 3, 5]

    two = bipartite_matching(HAND, present, torch.tensor([2]))
    assert two.merged[0].nonzero().flatten().tolist() == [2, 4]
    hidden, sizes = merge_tokens(HAND, HAND_SIZES, two)
    assert sizes[0].tolist() == [1, 5, 0, 2, 0, 1]  # the sources' sizes moved to their partners
    assert sizes.sum() == HAND_SIZES.sum()
    expected_1 = (2 * HAND[0, 1] + 3 * HAND[0, 2]) / 5  # (s_b·x_b + s_a·x_a) / (s_b + s_a)
    expected_3 = (HAND[0, 3] + HAND[0, 4]) / 2
    assert torch.allclose(hidden[0, 1], expected_1) and torch.allclose(hidden[0, 3], expected_3)
    assert torch.equal(hidden[0, [0, 5]], HAND[0, [0, 5]]), "tokens no merge reaches are untouched"

    # At most the A tokens other than CLS merge (half the tokens, as in ToMe), whatever r asks.
    assert bipartite_matching(HAND, present, torch.tensor([5])).merged.sum() == 2
    assert not bipartite_matching(HAND, present, torch.tensor([0])).merged.any()


def test_absent_tokens_take_no_part_and_the_split_alternates_over_the_present_ones():
    present = torch.tensor([[True, True, False, True, True, True, False]])  # present: 0, 1, 3, 4, 5
    metric = torch.randn(1, 7, 4, generator=torch.Generator().manual_seed(0))
    matching = bipartite_matching(metric, present, torch.tensor([5]))
    # A = {0, 3, 5}, B = {1, 4}: tokens 3 and 5 merge (CLS never), each into 1 or 4.
    assert matching.merged[0].nonzero().flatten().tolist() == [3, 5]
    assert set(matching.destination[0, [3, 5]].tolist()) <= {1, 4}
    assert matching.destination[0, [0, 1, 2, 4, 6]].tolist() == [0, 1, 2, 4, 6]


# ---------------------------------------------------------------------------------------------
# 2. Through the engine: the schedule, sizes, CLS, a plain reference, soft = hard


def test_each_layer_leaves_the_schedule_count_and_sizes_add_up_to_the_input():
    gated = tome(keep=0.4)  # 0.8, 0.6, 0.4 of each input
    seen = recording_sizes(gated)
    input_ids, attention_mask = make_batch(seed=6)
    with torch.no_grad():
        out = gated(input_ids, attention_mask, hard=True)
    n = torch.tensor(LENGTHS)
    expected = torch.stack([torch.ceil(n * f - 1e-6) for f in (0.8, 0.6, 0.4)], dim=1).long()
    assert torch.equal(out.kept, expected)
    assert out.present[:, :, 0].all(), "CLS was merged"
    assert len(seen) == LAYERS
    for alive, sizes in seen:
        assert torch.equal(torch.where(alive, sizes, 0).sum(dim=1), n.float()), "sizes add up to the input"
        assert (sizes[~alive] == 0).all() and (sizes[alive] >= 1).all()
        assert sizes[:, 0].eq(1).all(), "CLS merges nothing into itself"


def reference_tome(model, input_ids: torch.Tensor, keep: float) -> tuple[torch.Tensor, list[int]]:
    """ToMe on one unpadded input, written plainly: BERT's layers by hand, a token list, loops.
    (logits, tokens left after each layer)."""
    bert, n = model.bert, input_ids.numel()
    x = bert.embeddings(input_ids=input_ids[None])[0]
    sizes = [1.0] * n
    kept = []
    for index, layer in enumerate(bert.encoder.layer):
        attention = layer.attention.self
        heads, head_size = attention.num_attention_heads, attention.attention_head_size
        m = x.size(0)

        def split(projection):
            return projection(x).view(m, heads, head_size).transpose(0, 1)

        query, key, value = split(attention.query), split(attention.key), split(attention.value)
        logits = query @ key.transpose(1, 2) / math.sqrt(head_size) + torch.log(torch.tensor(sizes))  # proportional
        context = (torch.softmax(logits, dim=-1) @ value).transpose(0, 1).reshape(m, -1)
        attended = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + x)

        target = max(1, math.ceil((1 - (1 - keep) * (index + 1) / LAYERS) * n - 1e-9))
        a_tokens, b_tokens = list(range(0, m, 2)), list(range(1, m, 2))
        r = max(0, min(m - target, len(a_tokens) - 1))
        unit = attended / attended.norm(dim=-1, keepdim=True)
        partner, similarity = {}, {}
        for a in a_tokens[1:]:  # CLS is never merged
            sims = [float(unit[a] @ unit[b]) for b in b_tokens]
            best = max(range(len(b_tokens)), key=lambda j: sims[j])
            partner[a], similarity[a] = b_tokens[best], sims[best]
        merged = sorted(partner, key=lambda a: -similarity[a])[:r]
        rows, new_sizes = [], []
        for token in range(m):
            if token in merged:
                continue
            sources = [token] + [a for a in merged if partner[a] == token]
            total = sum(sizes[s] for s in sources)
            rows.append(sum(sizes[s] * attended[s] for s in sources) / total)
            new_sizes.append(total)
        attended, sizes = torch.stack(rows), new_sizes
        kept.append(len(sizes))
        x = layer.output(layer.intermediate(attended), attended)
    logits = model.classifier(model.dropout(bert.pooler(x[None])))[0]
    return logits, kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hard_mode_is_the_plain_reference(seed):
    gated = tome(keep=0.3, seed=seed)
    input_ids, attention_mask = make_batch(seed=seed, width=15)
    with torch.no_grad():
        out = gated(input_ids, attention_mask, hard=True)
        for row, n in enumerate(LENGTHS):
            logits, kept = reference_tome(gated.model, input_ids[row, :n], keep=0.3)
            assert out.kept[row].tolist() == kept, f"row {row}"
            assert (out.logits[row] - logits).abs().max() <= 1e-5, f"row {row}"
    assert (out.kept[:, -1] < out.num_tokens).all()


def test_soft_mode_merges_in_place_as_hard_mode_does_on_a_padded_batch():
    input_ids, attention_mask = make_batch(seed=3, width=15)
    for seed in range(3):
        gated = tome(seed=seed)
        with torch.no_grad():
            soft = gated(input_ids, attention_mask, hard=False)
            hard = gated(input_ids, attention_mask, hard=True)
        assert (soft.logits - hard.logits).abs().max() <= 1e-4, f"seed {seed}"
        assert torch.equal(soft.kept, hard.kept) and torch.equal(soft.present, hard.present), f"seed {seed}"
        assert soft.decided.tolist() == soft.decisions.tolist(), "merges are 0/1 decisions"
        assert soft.flops_ratio_soft.item() == pytest.approx(soft.flops_ratio_hard.item(), rel=1e-6)
    # The averages carry gradient in training (the matching does not: it is an argmax).
    gated = tome(seed=0).train()
    gated(input_ids, attention_mask).logits.sum().backward()
    assert gated.model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_nothing_merges_before_method_start():
    method = TokenMerging(list(range(LAYERS)), MAX_LENGTH, LAYERS, keep=0.4, start=0.5)
    gated = GatedModel(make_bert(seed=2), method).train()
    input_ids, attention_mask = make_batch(seed=2)
    method.begin_step(4, 10)
    assert torch.equal(gated(input_ids, attention_mask).kept, attention_mask.sum(1, keepdim=True).expand(-1, LAYERS))
    with torch.no_grad():  # evaluation merges whatever the step (a reloaded model would)
        assert (gated.eval()(input_ids, attention_mask, hard=True).kept[:, -1] < torch.tensor(LENGTHS)).all()
    gated.train()
    method.begin_step(5, 10)
    assert (gated(input_ids, attention_mask).kept[:, -1] < torch.tensor(LENGTHS)).all()


# ---------------------------------------------------------------------------------------------
# 3. FLOPs: the engine counts the merged token counts


@pytest.mark.parametrize("layers", [None, [1]])
def test_analytic_flops_of_the_merged_counts_match_the_counter(layers):
    gated = tome(seed=9, layers=layers)
    input_ids, attention_mask = make_batch(lengths=(13,), seed=9)
    with torch.no_grad():
        out = gated(input_ids, attention_mask, hard=True)
    assert out.kept[0, -1] < 13, "nothing merged: the check would only repeat the baseline's"
    analytic = float(flops_per_example(out.num_tokens, out.kept, DIMS)[0])
    # The matching's similarity product is the one matrix product the engine's count leaves out.
    entering = torch.cat([out.num_tokens[:, None], out.kept[:, :-1]], dim=1)[0, gated.method.layers]
    matching = 2 * float(matching_macs(entering, DIMS.hidden).sum())
    counted = count_matmul_flops(gated, input_ids, attention_mask, hard=True)
    assert abs(analytic + matching - counted) / counted <= 0.01, f"analytic {analytic} + {matching}, counted {counted}"
    # What is left out is small beside a layer, and smaller for wider models (bert-base at 64 tokens).
    assert matching / counted < 0.02
    bert_base = EncoderDims(hidden=768, intermediate=3072, num_layers=12, head_macs=0)
    layer = bert_base.layer_macs(torch.tensor(64.0), torch.tensor(64.0))
    assert float(matching_macs(torch.tensor(64), 768) / layer) < 0.002


# ---------------------------------------------------------------------------------------------
# 4. Config, the CLI, sweep, report, export


def test_tome_composes_with_its_knob_and_refuses_bad_values():
    cfg = compose_config(["method=tome"])
    assert cfg.run_name == "tome-keep0.5-seed0" and cfg.method.keep == 0.5 and cfg.method.start == 0.0
    for overrides, message in [(["method.keep=0"], "method.keep=0 is not valid"),
                               (["method.start=1.5"], "method.start=1.5 is not valid")]:
        with pytest.raises(DynbertError, match=re.escape(message)):
            compose_config(["method=tome", *overrides])
    _, runs, _ = plan_sweep(["method=tome", "method.keep=0.3,1.0", "sweep.baseline=false"])
    assert len(runs) == 1 and "method=tome" in runs[0] and "method.keep=0.3,1.0" in runs[0]


@pytest.fixture(scope="module")
def tome_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tome-run")
    run_dir = root / "tome-keep0.3-seed0"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = invoke("train", "method=tome", "model=tiny", *FAST, *SYNTHETIC, "method.keep=0.3",
                        f"output_dir={run_dir}")
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert "synthetic tome keep=0.3:" in result.stderr
    return run_dir


def test_tome_trains_through_the_cli_and_reloads_with_the_same_hard_predictions(tome_run):
    metrics = read_json(tome_run / "metrics.json")
    assert metrics["method"] == "tome" and metrics["knob"] == "method.keep" and metrics["knob_value"] == 0.3
    assert metrics["flops_ratio"] < 1, "the run merged nothing: reloading it would prove little"
    assert metrics["decided"] == 1.0
    hard = _evaluate_reloaded(tome_run, hard=True)
    assert hard["score"] == metrics["score"]
    assert hard["flops"].mean().item() == pytest.approx(metrics["flops_per_example"], rel=1e-12)
    assert hard["kept"].mean(dim=0).tolist() == pytest.approx(metrics["kept_per_layer"], rel=1e-12)
    soft = _evaluate_reloaded(tome_run, hard=False)
    assert torch.equal(soft["predictions"], hard["predictions"])


def test_a_tome_run_is_reported_under_its_method_and_knob(tome_run):
    table = render_table(tome_run.parent, "runs")
    assert any(line.startswith("| tome | keep | 0.3 |") for line in table.splitlines()), table


def test_export_refuses_tome_in_one_sentence(tome_run, tmp_path):
    result = invoke("export", tome_run, "--out", tmp_path / "export")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "method tome merges tokens" in result.stderr
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_tome_sweeps_over_its_grid_and_reports(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_dynbert("sweep", *FAST, *SYNTHETIC, "method=tome", "method.keep=0.3,1.0", "sweep.baseline=false",
                         f"output_dir={sweep}")
    assert result.returncode == 0, result.stderr
    assert {path.parent.name for path in sweep.glob("synthetic/*/metrics.json")} == {
        "tome-keep0.3-seed0", "tome-keep1.0-seed0"}
    table = render_table(sweep, "runs")
    merged = next(line for line in table.splitlines() if line.startswith("| tome | keep | 0.3 |"))
    assert merged.split(" | ")[5] != "—"  # Δ vs knob off: measured from keep = 1
