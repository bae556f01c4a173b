"""The real pretrained MPNet (sentence-transformers/all-mpnet-base-v2, 12 layers x 768) through dynbert.

Its 438 MB are not kept in ../shared: `bash ../shared/data/get-mpnet.sh` assembles them (about 30 s)
into $DYNBERT_MODELS/all-mpnet-base-v2, ~/.cache/dynbert-models/all-mpnet-base-v2 by default, where
this test looks; without that folder it skips, saying so. One gated forward of two real sentences in
soft and in hard mode, a few seconds on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dynbert.config import compose_config
from dynbert.core import count_matmul_flops
from dynbert.modeling import build_model, make_gated_model
from dynbert.tasks import get_task

MPNET = Path(os.environ.get("DYNBERT_MODELS", "~/.cache/dynbert-models")).expanduser() / "all-mpnet-base-v2"
pytestmark = pytest.mark.skipif(not (MPNET / "model.safetensors").is_file(),
                                reason=f"no pretrained MPNet at {MPNET}: `bash ../shared/data/get-mpnet.sh` writes it "
                                       "there ($DYNBERT_MODELS moves both)")

# Two SST-2-like sentences of the same length (10 tokens), so the hard-mode batch has no padding and
# torch's counter counts exactly the real tokens the formula counts.
SENTENCES = ["a gorgeous , witty , seductive movie .", "an utterly tedious and lifeless film ."]


def test_real_mpnet_loads_every_encoder_weight_and_prunes_as_it_masks():
    cfg = compose_config(["task=sst2", "model=mpnet-base", f"model.name_or_path={MPNET}", "method=topk"])
    model, tokenizer = build_model(cfg.model, get_task("sst2"), cfg.task.max_length, [])
    assert model.config.model_type == "mpnet" and model.config.num_hidden_layers == 12
    saved = load_file(MPNET / "model.safetensors")  # an MPNetModel checkpoint: no "mpnet." prefix
    encoder = {key.removeprefix("mpnet."): tensor for key, tensor in model.state_dict().items()
               if key.startswith("mpnet.")}
    assert encoder.keys() <= saved.keys(), "an encoder weight is not in the checkpoint: it would be random"
    assert all(torch.equal(tensor, saved[key]) for key, tensor in encoder.items())
    new = model.state_dict().keys() - {f"mpnet.{key}" for key in saved}
    assert {key.split(".")[0] for key in new} == {"classifier"}

    gated = make_gated_model(model, cfg.method, cfg.task.max_length).eval()  # top-k: decisions 0/1
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert batch["attention_mask"].all() and "token_type_ids" not in batch
    inputs = (batch["input_ids"], batch["attention_mask"])
    runs = []
    counted = count_matmul_flops(lambda: runs.append(gated(*inputs, hard=True)))
    hard = runs[0]
    with torch.no_grad():
        soft = gated(*inputs, hard=False)
    assert (hard.kept[:, -1] < hard.num_tokens).all(), "nothing was dropped: the check would be empty"
    assert torch.equal(soft.kept, hard.kept) and torch.equal(soft.present, hard.present)
    assert (soft.logits - hard.logits).abs().max() <= 1e-4
    analytic = gated.flops(hard)[0].sum()
    assert abs(float(analytic) - counted) <= 0.01 * counted, f"analytic {float(analytic)}, counted {counted}"
