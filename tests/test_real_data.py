"""Real GLUE and a real pretrained BERT from ../shared/data (skipped, with the reason, without it).

What the generated task cannot show: GLUE's own files load with their official counts, the real
MiniLM checkpoint loads with nothing missing but the new head, and a short real fine-tuning run
learns, prunes and gives the same predictions in soft and hard mode.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynbert.config import compose_config
from dynbert.data import encode, load_splits
from dynbert.evaluate import predict
from dynbert.modeling import build_model
from dynbert.tasks import get_task
from dynbert.train import load_run, train

from helpers import CONTRACT_KEYS, invoke, read_json

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GLUE, MINILM = SHARED / "glue", SHARED / "models" / "all-MiniLM-L6-v2"
pytestmark = [pytest.mark.requires_data("glue", "models/all-MiniLM-L6-v2"), pytest.mark.slow]

# GLUE's official sizes (train, dev): ../shared/data/README.md.
OFFICIAL = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500),
            "rte": (2490, 277), "wnli": (635, 71)}
MINILM_ARGS = ["model=minilm", f"model.name_or_path={MINILM}", f"glue_dir={GLUE}"]


@pytest.mark.parametrize("task", sorted(OFFICIAL))
def test_every_real_glue_file_loads_with_its_official_counts(task):
    cfg = compose_config([f"task={task}", f"glue_dir={GLUE}"])
    splits = load_splits(cfg, get_task(task))
    assert (len(splits["train"]), len(splits["validation"])) == OFFICIAL[task]


def test_minilm_loads_with_only_the_new_head_missing():
    """build_model refuses a checkpoint with any other weight missing; MiniLM passes that check."""
    cfg = compose_config(["task=sst2", *MINILM_ARGS])
    model, tokenizer = build_model(cfg.model, get_task("sst2"), cfg.task.max_length, [])
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 6
    assert len(tokenizer) == model.config.vocab_size == 30522
    assert model.config.id2label == {0: "negative", 1: "positive"}


def test_a_checkpoint_missing_encoder_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "minilm-without-layer-5"
    broken.mkdir()
    for path in MINILM.iterdir():
        if path.name != "model.safetensors":
            (broken / path.name).write_bytes(path.read_bytes())
    weights = load_file(MINILM / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layer.5." not in k}, broken / "model.safetensors")
    result = invoke("train", "task=sst2", "model=minilm", f"model.name_or_path={broken}", f"glue_dir={GLUE}",
                    f"output_dir={tmp_path / 'run'}")
    assert result.exit_code == 2, result.output
    message = result.stderr.strip().splitlines()[-1]
    assert "do not load" in message and "encoder.layer.5" in message and "Traceback" not in result.output
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_short_real_run_learns_prunes_and_agrees_in_soft_and_hard_mode(tmp_path):
    """MiniLM, 480 real SST-2 sentences, 3 epochs, the shipped gates recipe: about a minute on 2 cores."""
    cfg = compose_config(["task=sst2", *MINILM_ARGS, "train.max_train_samples=480", "train.max_eval_samples=200",
                          "train.epochs=3", "train.batch_size=16", "train.lr=1e-4", "lambda=0.3",
                          f"output_dir={tmp_path}"])
    metrics = train(cfg)
    assert CONTRACT_KEYS <= set(read_json(tmp_path / "metrics.json"))
    assert metrics["score"] > 0.65  # above the 0.5 of chance: it learned from real text
    assert metrics["flops_ratio"] < 1  # and pruned
    # The hardened model: soft mode (0/1 gates scale and mask) predicts what hard mode (gathered) does.
    gated = load_run(tmp_path)
    spec = get_task("sst2")
    _, tokenizer = build_model(cfg.model, spec, cfg.task.max_length, [])
    dev = encode(load_splits(cfg, spec)["validation"], tokenizer, cfg.task.max_length, spec)
    soft = predict(gated, dev, 64, hard=False, spec=spec)
    hard = predict(gated, dev, 64, hard=True, spec=spec)
    assert torch.equal(soft["predictions"], hard["predictions"])
    assert hard["flops"].sum() < hard["baseline_flops"].sum()
