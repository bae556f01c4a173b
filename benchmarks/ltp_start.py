"""What LTP keeps *before it has learned anything*: the pretrained model with LTP's starting
thresholds θ_l = method.threshold·(l+1)/L, in hard mode, on a task's first dev inputs. (README,
"Methods compared on real GLUE": why SST-2's λ collapsed LTP on RTE.)

    python benchmarks/ltp_start.py task=rte task.data_dir=../shared/data/glue/RTE \
        model.name_or_path=../shared/data/models/all-MiniLM-L6-v2 [--examples 256]

Any config override composes as for `dynbert train` (method=ltp is added). Prints the inputs' mean
length and the share of their real tokens kept after each layer (CLS included).
"""

from __future__ import annotations

import argparse

import torch

from dynbert.config import compose_config
from dynbert.data import collate, encode, load_splits
from dynbert.modeling import build_model, make_gated_model
from dynbert.tasks import all_texts, get_task


@torch.no_grad()
def kept_at_start(overrides: list[str], examples: int, batch_size: int = 64) -> tuple[float, list[float]]:
    """(mean real length, share of real tokens kept after each layer) of the first dev inputs."""
    cfg = compose_config([*overrides, "method=ltp"])
    spec = get_task(cfg.task.name)
    splits = load_splits(cfg, spec)
    model, tokenizer = build_model(cfg.model, spec, cfg.task.max_length, all_texts(splits["train"]))
    gated = make_gated_model(model, cfg.method, cfg.task.max_length).eval()
    data = encode(splits[spec.eval_splits[0]][:examples], tokenizer, cfg.task.max_length, spec)
    count = len(data.input_ids)
    lengths, kept = [], []
    for start in range(0, count, batch_size):
        batch = collate(data, list(range(start, min(start + batch_size, count))))
        out = gated(batch.input_ids, batch.attention_mask, batch.token_type_ids, hard=True)
        lengths.append(out.num_tokens.float())
        kept.append(out.kept.float())
    lengths, kept = torch.cat(lengths), torch.cat(kept)
    return lengths.mean().item(), (kept.sum(dim=0) / lengths.sum()).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, as for dynbert train")
    parser.add_argument("--examples", type=int, default=256, help="how many dev inputs (the first ones)")
    args = parser.parse_args()
    length, kept = kept_at_start(args.overrides, args.examples)
    print(f"mean length {length:.1f} tokens; kept after layers 1..{len(kept)}: "
          + " ".join(f"{100 * k:.0f}%" for k in kept))


if __name__ == "__main__":
    main()
