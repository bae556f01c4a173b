"""Tests of dynbert.core: gates, soft/hard equivalence, physical pruning, regularizer, FLOPs.

Everything runs on a tiny random BERT (hidden 32, 3 layers, 2 heads, vocab 100, length <= 16).
Its weights are drawn wider than BERT's usual 0.02 (0.1) so that token scores are far apart and
ranks are not decided by rounding; much wider (0.5) gives the peaked attention of a trained model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F
from transformers import BertConfig, BertForSequenceClassification

from dynbert.core import GatedModel, baseline_kept, count_matmul_flops, flops_per_example
from dynbert.encoders import EncoderDims
from dynbert.methods.gates import TokenGates, bimodal_weight, depth_weights, gate_regularizer

from helpers import gated_bert

HIDDEN, INTERMEDIATE, LAYERS, HEADS, VOCAB, POSITIONS, LABELS = 32, 64, 3, 2, 100, 16, 3
MAX_LENGTH = 16
DIMS = EncoderDims(hidden=HIDDEN, intermediate=INTERMEDIATE, num_layers=LAYERS, head_macs=HIDDEN * HIDDEN + HIDDEN * LABELS)
LENGTHS = (12, 9, 5, 3)  # a padded batch of mixed lengths; the longest is itself shorter than 16
CLS, SEP, PAD = 1, 2, 0
SCORES = ("attention_received", "cls_attention")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: extra threads only spin on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_bert(seed: int = 0, attn: str = "sdpa", init: float = 0.1) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                        max_position_embeddings=POSITIONS, num_labels=LABELS,
                        initializer_range=init, attn_implementation=attn)
    return BertForSequenceClassification(config).eval()


def make_batch(lengths=LENGTHS, seed: int = 0, width: int | None = None):
    """[CLS] random words [SEP], right-padded to `width` (default: the longest)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths) if width is None else width
    input_ids = torch.full((len(lengths), width), PAD)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = torch.randint(5, VOCAB, (n,), generator=generator)
        input_ids[row, 0], input_ids[row, n - 1] = CLS, SEP
        attention_mask[row, :n] = 1
    return input_ids, attention_mask


def set_random_binary_gates(gated: GatedModel, seed: int, parametrization: str) -> None:
    """Gates exactly 0/1 in a random (not rank-ordered) pattern, about 2/3 open."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if parametrization == "clip":
            raw = (torch.rand(gated.method.gates.raw.shape, generator=generator) < 0.67).float()
            gated.method.gates.raw.copy_(raw)
        else:
            gated.method.gates.raw.copy_(torch.randn(gated.method.gates.raw.shape, generator=generator) * 3 + 1.0)
            gated.method.gates.harden_()
    gates = gated.method.gates()
    assert torch.all((gates == 0) | (gates == 1))


def close_ranks_from(gated: GatedModel, ks: list[int]) -> None:
    """Gated row r keeps ranks < ks[r] (clip gates)."""
    with torch.no_grad():
        gated.method.gates.raw.fill_(1.0)
        for row, k in enumerate(ks):
            gated.method.gates.raw[row, k:] = 0.0


# ---------------------------------------------------------------------------------------------
# 1. Open gates change nothing


@pytest.mark.parametrize("reference_attn", ["sdpa", "eager"])
@pytest.mark.parametrize("score", SCORES)
def test_open_gates_match_hf_forward(reference_attn, score):
    model = make_bert(seed=1)
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = reference_attn
    gated = gated_bert(model, MAX_LENGTH, score=score).eval()
    # The reference must still be HF's own attention, not ours, and not share the gated config.
    assert reference.config._attn_implementation == reference_attn
    assert model.config._attn_implementation == "dynbert"
    assert reference.bert.encoder.layer[0].attention.self.config is not model.config
    input_ids, attention_mask = make_batch(seed=1)

    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        for hard in (False, True):
            out = gated(input_ids, attention_mask, hard=hard)
            assert (out.logits - expected).abs().max() <= 1e-5, f"hard={hard}"
            assert torch.equal(out.kept, attention_mask.sum(1, keepdim=True).expand(-1, LAYERS))


def test_wrapped_model_hf_forward_still_masks_padding():
    """GatedModel switches the wrapped model's config to the "dynbert" kernel, so HF's own forward of
    `gated.model` must still mask pads: transformers builds no mask for an attention implementation
    without a registered mask function (core registers sdpa's for "dynbert"), and pads would be attended."""
    model = make_bert(seed=2)
    reference = copy.deepcopy(model)
    gated = gated_bert(model, MAX_LENGTH)
    input_ids, attention_mask = make_batch(seed=2)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        got = gated.model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (got - expected).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# 2. With 0/1 gates, soft mode is hard mode


@pytest.mark.parametrize("ranks", ["absolute", "relative"])
@pytest.mark.parametrize("monotone", [False, True])
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("parametrization", ["clip", "sigmoid"])
def test_binary_gates_soft_equals_hard(parametrization, score, monotone, ranks):
    input_ids, attention_mask = make_batch(seed=3)
    pruned_somewhere = False
    for seed in range(3):
        torch.manual_seed(seed)
        gated = gated_bert(make_bert(seed=seed), MAX_LENGTH, score=score, parametrization=parametrization,
                           monotone=monotone, ranks=ranks).eval()
        set_random_binary_gates(gated, seed=100 + seed, parametrization=parametrization)
        with torch.no_grad():
            soft = gated(input_ids, attention_mask, hard=False)
            hard = gated(input_ids, attention_mask, hard=True)
        assert (soft.logits - hard.logits).abs().max() <= 1e-4, f"seed {seed}"
        assert torch.equal(soft.kept, hard.kept), f"seed {seed}"
        assert torch.equal(soft.present, hard.present), f"seed {seed}"
        assert torch.equal(soft.num_tokens, hard.num_tokens)
        pruned_somewhere |= bool((hard.kept < hard.num_tokens[:, None]).any())
    assert pruned_somewhere, "the random gates never dropped a token: the test proves nothing"


def test_binary_gates_soft_equals_hard_on_a_gate_layer_subset():
    torch.manual_seed(0)
    gated = gated_bert(make_bert(seed=4), MAX_LENGTH, layers=[1]).eval()
    close_ranks_from(gated, [4])
    input_ids, attention_mask = make_batch(seed=4)
    with torch.no_grad():
        soft = gated(input_ids, attention_mask, hard=False)
        hard = gated(input_ids, attention_mask, hard=True)
    assert (soft.logits - hard.logits).abs().max() <= 1e-4
    n = torch.tensor(LENGTHS)
    expected = torch.stack([n, n.clamp(max=4), n.clamp(max=4)], dim=1)
    assert torch.equal(hard.kept, expected) and torch.equal(soft.kept, expected)


@pytest.mark.parametrize("hard", [False, True])
def test_relative_ranks_keep_a_share_of_each_input_absolute_ranks_a_count(hard):
    """Gates open for the first half of the 16 ranks: absolute ranks keep up to 8 tokens of any
    input; relative ranks (rank r of n meets gate floor(r·16/n)) keep half of each input."""
    input_ids, attention_mask = make_batch(seed=5)  # lengths 12, 9, 5, 3
    kept = {}
    for ranks in ("absolute", "relative"):
        gated = gated_bert(make_bert(seed=5), MAX_LENGTH, layers=[0], ranks=ranks).eval()
        close_ranks_from(gated, [8])
        with torch.no_grad():
            kept[ranks] = gated(input_ids, attention_mask, hard=hard).kept[:, 0].tolist()
    assert kept == {"absolute": [8, 8, 5, 3], "relative": [6, 5, 3, 2]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_gate_removes_a_heavily_attended_key_as_gathering_does(seed):
    """A gate of exactly 0 must remove its token as a key in later layers, as gathering does,
    also when that token drew most of the attention (peaked attention, as in a trained BERT).

    A closed key with only log(1e-6) added to its logits, not blocked, still takes 1e-6 * exp(logit
    gap) of the attention: seeds 0 and 2 gave logits up to 0.06 apart with exact 0/1 gates."""
    gated = gated_bert(make_bert(seed=seed, init=0.5), MAX_LENGTH).eval()
    with torch.no_grad():
        gated.method.gates.raw[0, 1] = 0.0  # layer 0 drops its most-attended token; every other gate is 1
    input_ids, attention_mask = make_batch(lengths=(12,), seed=3)
    with torch.no_grad():
        soft = gated(input_ids, attention_mask, hard=False)
        hard = gated(input_ids, attention_mask, hard=True)
    assert torch.equal(soft.kept, hard.kept) and hard.kept.tolist() == [[11, 11, 11]]
    assert (soft.logits - hard.logits).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------
# 3. Hard mode physically shortens the sequence


def _widths_entering(gated, *args, **kwargs):
    """Run `gated` and return the (batch, length) of what enters each layer's attention and FFN."""
    attention, ffn = [], []
    handles = []
    for layer in gated.model.bert.encoder.layer:
        handles.append(layer.attention.register_forward_pre_hook(
            lambda module, args, kw: attention.append(tuple((args[0] if args else kw["hidden_states"]).shape[:2])),
            with_kwargs=True))
        handles.append(layer.intermediate.register_forward_pre_hook(
            lambda module, args: ffn.append(tuple(args[0].shape[:2]))))
    try:
        with torch.no_grad():
            out = gated(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out, attention, ffn


@pytest.mark.parametrize("gate_layers", [None, [1]])
@pytest.mark.parametrize("score", SCORES)
def test_gathered_hidden_states_are_shorter(score, gate_layers):
    torch.manual_seed(0)
    gated = gated_bert(make_bert(seed=5), MAX_LENGTH, score=score, layers=gate_layers).eval()
    close_ranks_from(gated, [7, 4, 2] if gate_layers is None else [4])
    input_ids, attention_mask = make_batch(seed=5)  # padded to the longest, 12
    out, attention, ffn = _widths_entering(gated, input_ids, attention_mask, hard=True)

    schedule_in = torch.cat([out.num_tokens[:, None], out.kept[:, :-1]], dim=1)
    assert [width for _, width in attention] == schedule_in.max(dim=0).values.tolist()
    assert [width for _, width in ffn] == out.kept.max(dim=0).values.tolist()
    if gate_layers is None:
        assert [width for _, width in attention] == [12, 7, 4] and [width for _, width in ffn] == [7, 4, 2]
    else:
        assert [width for _, width in attention] == [12, 12, 4] and [width for _, width in ffn] == [12, 4, 4]
    assert all(batch == len(LENGTHS) for batch, _ in attention + ffn)

    # Soft mode keeps the full padded width everywhere: masking is not pruning.
    _, attention, ffn = _widths_entering(gated, input_ids, attention_mask, hard=False)
    assert [width for _, width in attention + ffn] == [12] * (2 * LAYERS)


def test_hard_mode_drops_pure_padding_before_layer_0():
    """Inputs padded wider than their longest example (e.g. a tokenizer's padding="max_length")
    should enter layer 0 at the longest real length, since FLOPs are counted on real tokens (12 here,
    not the padded width, 16)."""
    torch.manual_seed(0)
    gated = gated_bert(make_bert(seed=5), MAX_LENGTH).eval()
    close_ranks_from(gated, [7, 4, 2])
    input_ids, attention_mask = make_batch(seed=5, width=MAX_LENGTH)
    out, attention, ffn = _widths_entering(gated, input_ids, attention_mask, hard=True)
    assert [width for _, width in attention] == [12, 7, 4]
    assert out.present.shape == (len(LENGTHS), LAYERS, MAX_LENGTH)


# ---------------------------------------------------------------------------------------------
# 4. Invariants: CLS stays, pads never kept, counts never grow, batching does not matter


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("score", SCORES)
def test_cls_survives_all_gates_closed(score, hard):
    torch.manual_seed(0)
    gated = gated_bert(make_bert(seed=6), MAX_LENGTH, score=score).eval()
    with torch.no_grad():
        gated.method.gates.raw.zero_()
    input_ids, attention_mask = make_batch(seed=6)
    with torch.no_grad():
        out = gated(input_ids, attention_mask, hard=hard)
    assert out.present[:, :, 0].all()
    assert torch.equal(out.present, torch.zeros_like(out.present).index_fill_(2, torch.tensor([0]), True))
    assert torch.equal(out.kept, torch.ones_like(out.kept))
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("score", SCORES)
def test_pads_never_kept_and_counts_never_grow(score, hard):
    input_ids, attention_mask = make_batch(seed=7, width=15)
    for seed in range(3):
        torch.manual_seed(seed)
        gated = gated_bert(make_bert(seed=seed), MAX_LENGTH, score=score).eval()
        with torch.no_grad():  # fractional gates, about half of them below 0.5
            gated.method.gates.raw.copy_(torch.rand(gated.method.gates.raw.shape))
            out = gated(input_ids, attention_mask, hard=hard)
        pads = ~attention_mask.bool()
        assert not (out.present & pads[:, None, :]).any()
        assert torch.equal(out.kept, out.present.sum(dim=2))
        assert (out.kept[:, 1:] <= out.kept[:, :-1]).all()
        assert (out.kept[:, 0] <= out.num_tokens).all()
        # once dropped, a position never comes back
        assert not (out.present[:, 1:] & ~out.present[:, :-1]).any()
        assert torch.equal(out.num_tokens, attention_mask.sum(dim=1))


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("score", SCORES)
def test_example_alone_equals_example_in_padded_batch(score, hard):
    torch.manual_seed(0)
    gated = gated_bert(make_bert(seed=8), MAX_LENGTH, score=score).eval()
    with torch.no_grad():  # fractional gates: soft mode scales, hard mode keeps g >= 0.5
        gated.method.gates.raw.copy_(torch.rand(gated.method.gates.raw.shape) * 0.6 + 0.3)
    input_ids, attention_mask = make_batch(seed=8, width=16)
    with torch.no_grad():
        together = gated(input_ids, attention_mask, hard=hard)
        for row, n in enumerate(LENGTHS):
            alone = gated(input_ids[row:row + 1, :n], attention_mask[row:row + 1, :n], hard=hard)
            assert (alone.logits[0] - together.logits[row]).abs().max() <= 1e-5, f"row {row}"
            assert torch.equal(alone.kept[0], together.kept[row])
            assert torch.equal(alone.present[0], together.present[row, :, :n])
    assert (together.kept < together.num_tokens[:, None]).any()


# ---------------------------------------------------------------------------------------------
# 5. Regularizer and the bi-modal schedule


def _gates_with(free_value: float, layers: int = 3, length: int = 5) -> torch.Tensor:
    gates = torch.full((layers, length), free_value)
    gates[:, 0] = 1.0
    return gates


def test_bimodal_term_zero_at_modes_and_largest_at_half():
    weights = torch.ones(3)
    assert gate_regularizer(_gates_with(0.0), weights, lam=0.0, mu=1.0).bimodal == 0
    assert gate_regularizer(_gates_with(1.0), weights, lam=0.0, mu=1.0).bimodal == 0
    values = torch.linspace(0, 1, 21)
    bimodal = torch.stack([gate_regularizer(_gates_with(float(v)), weights, 0.0, 1.0).bimodal for v in values])
    assert int(bimodal.argmax()) == 10  # g = 0.5
    assert bimodal[10] == pytest.approx(3 * 0.25)  # Σ over 3 layers of mean g(1-g)
    # mu scales it; lam does not touch it
    assert gate_regularizer(_gates_with(0.5), weights, 5.0, 2.0).bimodal == pytest.approx(2 * 3 * 0.25)


def test_bimodal_gradient_pushes_gates_to_the_nearest_mode():
    gates = torch.tensor([[1.0, 0.1, 0.3, 0.49, 0.51, 0.7, 0.9]], requires_grad=True)
    gate_regularizer(gates, torch.ones(1), lam=0.0, mu=1.0).bimodal.backward()
    grad = gates.grad[0]
    assert (grad[1:4] > 0).all(), "gradient descent must lower gates below 0.5"
    assert (grad[4:] < 0).all(), "gradient descent must raise gates above 0.5"
    assert grad[0] == 0, "the CLS gate is not regularized"


def test_sparsity_grows_with_lambda_and_with_depth():
    gates = _gates_with(0.6)
    weights = depth_weights([0, 1, 2], 3, "linear")
    assert torch.allclose(weights, torch.tensor([1 / 3, 2 / 3, 1.0]))
    assert torch.allclose(depth_weights([1], 3, "linear"), torch.tensor([2 / 3]))
    assert torch.equal(depth_weights([0, 2], 3, "none"), torch.ones(2))
    sparsity = [float(gate_regularizer(gates, weights, lam, 0.0).sparsity) for lam in (0.0, 0.1, 1.0, 3.0)]
    assert sparsity[0] == 0 and sparsity == sorted(sparsity) and len(set(sparsity)) == 4
    assert gate_regularizer(gates, weights, 1.0, 0.0).sparsity == pytest.approx(0.6 * (1 / 3 + 2 / 3 + 1))

    grad = {}
    for weighting in ("linear", "none"):
        leaf = gates.clone().requires_grad_(True)
        gate_regularizer(leaf, depth_weights([0, 1, 2], 3, weighting), 1.0, 0.0).sparsity.backward()
        grad[weighting] = leaf.grad[:, 1:].mean(dim=1)
        assert (leaf.grad[:, 0] == 0).all()
    assert grad["linear"][0] < grad["linear"][1] < grad["linear"][2]  # deeper pays more per gate
    assert torch.allclose(grad["none"], grad["none"][0].expand(3))
    with pytest.raises(ValueError, match="cubic"):
        depth_weights([0], 3, "cubic")


def test_bimodal_weight_schedules():
    lam, scale = 0.2, 10.0
    top = lam * scale
    for progress in (0.0, 0.1, 0.2):
        assert bimodal_weight(progress, lam, scale, "hold") == 0.0
    for progress in (0.5, 0.75, 1.0):
        assert bimodal_weight(progress, lam, scale, "hold") == pytest.approx(top)
    assert bimodal_weight(0.35, lam, scale, "hold") == pytest.approx(top / 2)
    ramp = [bimodal_weight(p, lam, scale, "hold") for p in (0.25, 0.3, 0.4, 0.45)]
    assert ramp == sorted(ramp) and 0 < ramp[0] and ramp[-1] < top
    assert bimodal_weight(0.0, lam, scale) == 0.0  # hold is the default
    for progress in (0.0, 0.3, 1.0):
        assert bimodal_weight(progress, lam, scale, "constant") == pytest.approx(top)
    with pytest.raises(ValueError, match="linear_warmup"):
        bimodal_weight(0.5, lam, scale, "linear_warmup")


# ---------------------------------------------------------------------------------------------
# 6. Analytic FLOPs agree with torch's counter


def _rel(a, b) -> float:
    return abs(float(a) - float(b)) / float(b)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("gate_layers, schedules", [
    (None, [[16, 16, 16], [6, 6, 6], [3, 3, 3], [1, 1, 1], [10, 6, 3], [9, 9, 2]]),
    ([1], [[16], [5], [2]]),
])
def test_analytic_flops_match_counter(score, gate_layers, schedules):
    torch.manual_seed(0)
    gated = gated_bert(make_bert(seed=9), MAX_LENGTH, layers=gate_layers, score=score).eval()
    input_ids, attention_mask = make_batch(lengths=(13,), seed=9)
    layers = list(range(LAYERS)) if gate_layers is None else gate_layers
    for ks in schedules:
        close_ranks_from(gated, ks)
        with torch.no_grad():
            out = gated(input_ids, attention_mask, hard=True)
        # the schedule really ran: each gated layer keeps min(k, what came in)
        expected, current = [], 13
        for index in range(LAYERS):
            if index in layers:
                current = min(current, ks[layers.index(index)])
            expected.append(current)
        assert out.kept[0].tolist() == expected
        analytic = flops_per_example(out.num_tokens, out.kept, DIMS)
        counted = count_matmul_flops(gated, input_ids, attention_mask, hard=True)
        assert _rel(analytic[0], counted) <= 0.01, f"schedule {ks}: analytic {float(analytic[0])}, counted {counted}"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_baseline_flops_match_counter_on_plain_bert(attn):
    model = make_bert(seed=10, attn=attn)
    for n in (16, 7):
        input_ids, attention_mask = make_batch(lengths=(n,), seed=n)
        counted = count_matmul_flops(model, input_ids=input_ids, attention_mask=attention_mask)
        num_tokens = attention_mask.sum(dim=1)
        analytic = flops_per_example(num_tokens, baseline_kept(num_tokens, LAYERS), DIMS)
        assert _rel(analytic[0], counted) <= 0.01
    # pruning is cheaper than the baseline, per example
    pruned = flops_per_example(num_tokens, torch.tensor([[5, 3, 1]]), DIMS)
    assert pruned[0] < analytic[0]


def test_flops_are_per_example_and_follow_the_formula():
    num_tokens = torch.tensor([10, 4])
    kept = torch.tensor([[6, 3], [4, 4]])
    got = flops_per_example(num_tokens, kept, EncoderDims(hidden=8, intermediate=32, num_layers=2, head_macs=8 * 8 + 8 * 2))
    D, I, C = 8, 32, 2

    def macs(n, ks):
        total, tokens_in = D * D + D * C, n
        for k in ks:
            total += 4 * D * D * tokens_in + 2 * D * tokens_in**2 + 2 * D * I * k
            tokens_in = k
        return total

    assert got.tolist() == [2 * macs(10, [6, 3]), 2 * macs(4, [4, 4])]


# ---------------------------------------------------------------------------------------------
# 7. Gradients reach the gates


@pytest.mark.parametrize("parametrization, raw", [("clip", 0.7), ("sigmoid", 0.85)])
@pytest.mark.parametrize("score", SCORES)
def test_task_loss_alone_reaches_the_gates(score, parametrization, raw):
    torch.manual_seed(0)
    gated = gated_bert(make_bert(seed=11), MAX_LENGTH, score=score, parametrization=parametrization).eval()
    with torch.no_grad():
        gated.method.gates.raw.fill_(raw)  # g = 0.7: open, and away from the clip boundaries
    input_ids, attention_mask = make_batch(seed=11)
    out = gated(input_ids, attention_mask, hard=False)
    F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 0])).backward()  # task loss only: lam = mu = 0
    grad = gated.method.gates.raw.grad
    assert grad is not None
    longest = max(LENGTHS)
    assert (grad[0, 1:longest] != 0).any(), "layer 0's gates get no task gradient"
    assert (grad[1, 1:longest] != 0).any(), "layer 1's gates get no task gradient"
    assert (grad[:, 0] == 0).all(), "the CLS gate is fixed at 1"
    assert (grad[:, longest:] == 0).all(), "ranks no token reaches cannot affect the loss"


@pytest.mark.parametrize("parametrization, raw", [("clip", 0.7), ("clip", 1.0), ("sigmoid", 3.0)])
def test_regularizer_alone_reaches_the_gates(parametrization, raw):
    torch.manual_seed(0)
    gates = TokenGates(3, MAX_LENGTH, parametrization)
    with torch.no_grad():
        gates.raw.fill_(raw)  # raw = 1.0 is the clip init: the boundary must still pass gradient
    gate_regularizer(gates(), depth_weights([0, 1, 2], 3), lam=0.5, mu=0.0).total.backward()
    assert (gates.raw.grad[:, 1:] > 0).all(), "sparsity must push every free gate down"
    assert (gates.raw.grad[:, 0] == 0).all()
    gates.raw.grad = None
    with torch.no_grad():
        gates.raw.fill_(0.3 if parametrization == "clip" else -0.5)
    gate_regularizer(gates(), depth_weights([0, 1, 2], 3), lam=0.0, mu=1.0).total.backward()
    assert (gates.raw.grad[:, 1:] > 0).all(), "below 0.5 the bi-modal term pushes gates down"


# ---------------------------------------------------------------------------------------------
# 8. TokenGates: projection, hardening, the CLS gate


def test_project_clamps_clip_raw_values():
    gates = TokenGates(2, 5, "clip")
    with torch.no_grad():
        gates.raw.copy_(torch.tensor([[1.0, -0.5, 0.3, 1.7, 1.0], [0.0, 2.0, -3.0, 0.5, 0.99]]))
    gates.project_()
    assert torch.equal(gates.raw.data, torch.tensor([[1.0, 0.0, 0.3, 1.0, 1.0], [0.0, 1.0, 0.0, 0.5, 0.99]]))
    assert gates.raw.requires_grad

    sigmoid = TokenGates(1, 3, "sigmoid")
    with torch.no_grad():
        sigmoid.raw.copy_(torch.tensor([[-4.0, 0.0, 5.0]]))
    sigmoid.project_()
    assert torch.equal(sigmoid.raw.data, torch.tensor([[-4.0, 0.0, 5.0]]))


@pytest.mark.parametrize("parametrization, raw", [
    ("clip", [0.9, 0.49, 0.5, 0.51, 0.0, 1.0, -0.2, 1.3]),
    ("sigmoid", [-9.0, -0.01, 0.0, 0.01, -5.0, 5.0, -20.0, 20.0]),
])
def test_harden_makes_gates_exactly_binary(parametrization, raw):
    gates = TokenGates(1, len(raw), parametrization)
    with torch.no_grad():
        gates.raw.copy_(torch.tensor([raw]))
    gates.harden_()
    # rank 0 is CLS: open whatever its raw value
    assert gates().tolist() == [[1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]]
    gates.harden_()  # idempotent
    assert gates().tolist() == [[1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]]


@pytest.mark.parametrize("parametrization", ["clip", "sigmoid"])
@pytest.mark.parametrize("monotone", [False, True])
def test_cls_gate_is_always_one(parametrization, monotone):
    torch.manual_seed(0)
    gates = TokenGates(3, 6, parametrization, monotone)
    assert torch.all(gates() > 0.9), "gates start open"
    with torch.no_grad():
        gates.raw.copy_(torch.randn(3, 6) * 3 - 2)
        gates.raw[:, 0] = -10.0
    values = gates()
    assert (values[:, 0] == 1).all()
    assert ((values >= 0) & (values <= 1)).all()
    if monotone:
        assert (values[:, 1:] <= values[:, :-1]).all()
    gates.harden_()
    assert (gates()[:, 0] == 1).all()


def test_monotone_gates_are_a_cumulative_minimum():
    gates = TokenGates(1, 6, "clip", monotone=True)
    with torch.no_grad():
        gates.raw.copy_(torch.tensor([[0.0, 0.9, 0.4, 0.8, 0.2, 0.6]]))
    assert torch.allclose(gates(), torch.tensor([[1.0, 0.9, 0.4, 0.4, 0.2, 0.2]]))


# ---------------------------------------------------------------------------------------------
# 9. Bad arguments


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=[0, 3]), r"\[3\]"),
    (dict(layers=[-1]), r"\[-1\]"),
    (dict(score="attention_given"), "attention_given"),
    (dict(parametrization="tanh"), "tanh"),
    (dict(max_length=POSITIONS + 1), str(POSITIONS + 1)),
])
def test_bad_constructor_arguments_raise(kwargs, message):
    kwargs = {"max_length": MAX_LENGTH, **kwargs}
    with pytest.raises(ValueError, match=message):
        gated_bert(make_bert(seed=12), **kwargs)


def test_input_longer_than_max_length_raises():
    gated = gated_bert(make_bert(seed=13), max_length=8)
    input_ids, attention_mask = make_batch(lengths=(9, 4), seed=13)
    with pytest.raises(ValueError, match="9"):
        gated(input_ids, attention_mask)
    with pytest.raises(ValueError, match="tanh"):
        TokenGates(2, 8, "tanh")


def test_hard_mode_skips_scoring_where_every_present_token_is_kept(monkeypatch):
    # Scoring forces eager attention and a sort; a layer that keeps everything must not pay it,
    # or hard mode with nothing pruned is slower than plain BERT (dynbert bench's full row).
    import dynbert.methods.gates as gates_module

    gated = gated_bert(make_bert(), max_length=POSITIONS).eval()
    ids, mask = make_batch()
    ranked = []
    real_rank = gates_module.rank_tokens
    monkeypatch.setattr(gates_module, "rank_tokens", lambda *args: ranked.append(1) or real_rank(*args))
    with torch.no_grad():
        gated(ids, mask, hard=True)
        assert ranked == []
        gated.method.gates.raw[1, max(LENGTHS) - 1:] = 0.0  # closes a rank only the longest input reaches
        out = gated(ids, mask, hard=True)
    assert len(ranked) == 1 and out.kept[0, 1] == max(LENGTHS) - 1
