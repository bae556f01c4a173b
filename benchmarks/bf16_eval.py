"""A finished run's first eval split in hard mode, in fp32 and under bf16 autocast: does bf16 keep
the same tokens, give the same predictions and the same score? (README, "GPUs, mixed precision".)

    python benchmarks/bf16_eval.py outputs/sweeps/glue-minilm/sst2/gates-lambda0.1-seed0 [--limit N]

Prints one line per precision and one of agreement (same_prediction is exact equality: for
classification tasks). bf16 here is autocast on the CPU (emulated,
and slow, where the CPU lacks AVX512-BF16 and AMX); on a GPU pass --device cuda.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dynbert.data import collate, encode, load_splits
from dynbert.modeling import load_model
from dynbert.rundir import MODEL_DIR, load_run_config
from dynbert.tasks import compute_metrics, get_task


@torch.no_grad()
def hard_outputs(gated, data, indices, spec, device, bf16: bool, batch_size: int = 64):
    """Predictions and (batch-independent) kept-token masks of every example in ``indices``."""
    predictions, present = [], []
    for start in range(0, len(indices), batch_size):
        batch = collate(data, indices[start:start + batch_size]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = gated(batch.input_ids, batch.attention_mask, batch.token_type_ids, hard=True)
        logits = out.logits.float().cpu()
        predictions += (logits.squeeze(-1) if spec.is_regression else logits.argmax(-1)).tolist()
        length = batch.input_ids.size(1)
        present += [row[:, :length] for row in out.present.cpu()]
    return predictions, present


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--limit", type=int, default=None, help="only the N shortest examples")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    cfg = load_run_config(args.run)
    spec = get_task(cfg.task.name)
    device = torch.device(args.device)
    gated, tokenizer = load_model(args.run / MODEL_DIR, cfg.method, cfg.task.max_length)
    gated.to(device).eval()
    split = spec.eval_splits[0]
    data = encode(load_splits(cfg, spec)[split], tokenizer, cfg.task.max_length, spec)
    # Sorted by length, as evaluation batches them, so padding stays small.
    indices = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))[: args.limit]
    labels = [data.labels[i].item() for i in indices]
    result = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        predictions, present = hard_outputs(gated, data, indices, spec, device, bf16)
        score = compute_metrics(spec, predictions, labels)[spec.main_metric]
        result[name] = dict(score=score, predictions=predictions, present=present)
        print(f"{name}: {spec.main_metric} {100 * score:.2f} on {len(indices)} {split} examples", flush=True)
    same_tokens = sum(torch.equal(a, b) for a, b in zip(result["fp32"]["present"], result["bf16"]["present"]))
    same = sum(a == b for a, b in zip(result["fp32"]["predictions"], result["bf16"]["predictions"]))
    summary = dict(run=str(args.run), examples=len(indices),
                   fp32=result["fp32"]["score"], bf16=result["bf16"]["score"],
                   points=100 * (result["bf16"]["score"] - result["fp32"]["score"]),
                   same_kept_tokens=same_tokens / len(indices), same_prediction=same / len(indices))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
