"""train(cfg) called directly on composed configs (as the lightning-hydra-template tests do):
what λ does, bf16 and CPU runs, and what mixed precision may and may not change."""

from __future__ import annotations

import pytest
import torch

from dynbert.config import compose_config
from dynbert.data import collate, encode, load_splits
from dynbert.evaluate import predict
from dynbert.modeling import build_model
from dynbert.tasks import all_texts, get_task
from dynbert.train import load_run, train

from helpers import FAST, SYNTHETIC, read_json

# Gates that move within a few dozen steps.
MOVES = [*FAST, "task.num_train=512", "task.num_eval=128", "train.max_train_samples=null",
         "train.max_eval_samples=null", "train.max_steps=null", "train.epochs=4", "train.batch_size=16",
         "model.hidden_size=64", "model.num_heads=2", "model.intermediate_size=128",
         "method.start=0", "method.lr=0.05"]
# A model that learns the task (77% in ~20 s): its logits have a scale worth comparing.
LEARNS = [*MOVES, "train.epochs=8", "train.lr=1e-3", "method.start=0.5"]


def test_train_returns_what_it_writes(tmp_path):
    metrics = train(compose_config([*FAST, *SYNTHETIC, f"output_dir={tmp_path}"]))
    assert metrics == read_json(tmp_path / "metrics.json")
    assert metrics["method"] == "gates" and metrics["precision"] == "fp32" and metrics["device"] == "cpu"


def test_flops_fall_as_lambda_grows(tmp_path):
    ratios = [train(compose_config([*MOVES, f"lambda={lam}", "method.sparsity=tokens",
                                    f"output_dir={tmp_path / str(lam)}"]))["flops_ratio"]
              for lam in (0.0, 0.3, 3.0)]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] < ratios[0] - 0.2, ratios


def test_bf16_training_keeps_fp32_gates_and_a_model_that_agrees_with_itself(tmp_path):
    metrics = train(compose_config([*LEARNS, "lambda=0.3", "train.precision=bf16", "train.device=cpu",
                                    f"output_dir={tmp_path}"]))
    assert metrics["precision"] == "bf16" and metrics["device"] == "cpu"
    assert metrics["hard_soft_agreement"] == 1.0  # evaluated under bf16 autocast, like training
    gated = load_run(tmp_path)
    assert gated.method.gates.raw.dtype == torch.float32  # master weights, never rounded to bf16
    assert all(param.dtype == torch.float32 for param in gated.model.parameters())


# How far bf16 may move things. Measured on this model (logits up to 1.3): bf16 moved them by at
# most 0.017 from fp32's, and hard and soft mode under bf16 agreed exactly. The tolerance stated
# and tested is 0.05 (fp32's is 1e-4, tests/test_core.py); predictions agree on >= 99%.
BF16_LOGIT_TOLERANCE = 0.05


def test_bf16_evaluation_matches_fp32_and_hard_matches_soft(tmp_path):
    cfg = compose_config([*LEARNS, "lambda=0.3", f"output_dir={tmp_path}"])
    train(cfg)
    gated, spec = load_run(tmp_path), get_task("synthetic")
    splits = load_splits(cfg, spec)
    _, tokenizer = build_model(cfg.model, spec, cfg.task.max_length, all_texts(splits["train"]))
    data = encode(splits["validation"], tokenizer, cfg.task.max_length, spec)

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    fp32_hard = predict(gated, data, 32, hard=True, spec=spec)
    bf16_hard = predict(gated, data, 32, hard=True, spec=spec, autocast=bf16)
    bf16_soft = predict(gated, data, 32, hard=False, spec=spec, autocast=bf16)
    agree = (fp32_hard["predictions"] == bf16_hard["predictions"]).float().mean().item()
    assert agree >= 0.99
    assert torch.equal(bf16_hard["flops"], fp32_hard["flops"])  # the same tokens were dropped
    assert (bf16_hard["predictions"] == bf16_soft["predictions"]).float().mean().item() >= 0.99

    inputs = collate(data, list(range(32)))  # the logits themselves, on the first 32 examples
    with torch.no_grad():
        reference = gated(inputs.input_ids, inputs.attention_mask, inputs.token_type_ids, hard=True).logits
        with bf16():
            hard = gated(inputs.input_ids, inputs.attention_mask, inputs.token_type_ids, hard=True).logits.float()
            soft = gated(inputs.input_ids, inputs.attention_mask, inputs.token_type_ids, hard=False).logits.float()
    assert (hard - reference).abs().max() <= BF16_LOGIT_TOLERANCE
    assert (hard - soft).abs().max() <= BF16_LOGIT_TOLERANCE


@pytest.mark.parametrize("override, message", [
    ("train.precision=fp16", "needs a CUDA GPU"),
    ("train.device=mps", "MPS is not available"),
])
def test_settings_this_machine_cannot_run_fail_before_any_work(tmp_path, override, message):
    from dynbert.errors import DynbertError

    with pytest.raises(DynbertError, match=message):
        train(compose_config([*FAST, *SYNTHETIC, override, f"output_dir={tmp_path}"]))
    assert not (tmp_path / "config.yaml").exists()


def test_gates_left_between_0_and_1_warn_that_rounding_changed_the_model():
    from dynbert.evaluate import run_warnings
    from dynbert.methods.gates import Gates

    gates = Gates([0, 1], max_length=16, num_layers=2)
    [warning] = run_warnings({"flops_ratio": 0.6, "decided": 0.8}, True, gates)
    assert warning.startswith("the soft decisions did not end at 0 or 1 (80% within 0.05, 95% wanted)")
    assert "method.bimodal_weight" in warning
    assert run_warnings({"flops_ratio": 0.6, "decided": 0.97}, True, gates) == []


def test_a_model_that_answers_one_class_warns_that_its_score_is_that_classs():
    """Seen on RTE: PoWER-BERT kept only CLS and scored 52.7%, the majority class, with no warning."""
    import torch

    from dynbert.evaluate import most_predicted, run_warnings
    from dynbert.methods.gates import Gates
    from dynbert.tasks import get_task

    rte, gates = get_task("rte"), Gates([0, 1], max_length=16, num_layers=2)
    labels = torch.tensor([0, 1, 1, 0, 1])
    collapsed = dict(most_predicted=most_predicted(rte, torch.ones(5, dtype=torch.long), labels), score=0.6,
                     flops_ratio=0.07, kept_per_layer=[0.02, 0.02], knob="lambda", knob_value=5e-4)
    [warning] = run_warnings(collapsed, True, gates)
    assert warning.startswith("100% of the dev predictions are 'not_entailment', and always answering it "
                              "scores 0.6000 (this run: 0.6000)")
    assert "prune less than lambda=0.0005 does (after the last layer 2% of the tokens were left)" in warning
    # An un-pruned baseline that collapsed is told to train differently, not to prune less.
    baseline = dict(collapsed, flops_ratio=1.0, kept_per_layer=[1.0, 1.0], knob=None, knob_value=None)
    assert "train longer or change train.lr" in run_warnings(baseline, False, Gates([], 16, 2))[0]
    # Four of five in one class (80%) is a skew a real model can have: no warning.
    learned = dict(collapsed, most_predicted=most_predicted(rte, torch.tensor([1, 1, 1, 0, 1]), labels))
    assert learned["most_predicted"]["share"] == 0.8 and run_warnings(learned, True, gates) == []


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_that_only_emulates_it_says_so(tmp_path, monkeypatch, native):
    """Emulated bf16 trained ~10x slower than fp32 on an AVX2-only CPU: a user must hear why."""
    from helpers import invoke

    monkeypatch.setattr("dynbert.train.cpu_has_native_bf16", lambda: native)
    result = invoke("train", *FAST, *SYNTHETIC, "train.precision=bf16", "train.device=cpu", f"output_dir={tmp_path}")
    assert result.exit_code == 0, result.output
    assert ("bf16 is emulated" in result.stderr) is not native
