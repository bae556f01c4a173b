"""Examples to tensors: the splits a run uses, tokenization, batches and their order.

Training batches are length-grouped by default (like HF's ``group_by_length``): the examples are
shuffled, then sorted by length inside large chunks, so each batch pads to little more than its
longest member. The order is a pure function of (seed, epoch), so a run resumes mid-epoch on the
same batches.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape

from .errors import DynbertError
from .tasks import Example, TaskSpec, glue_data_dir, load_glue, make_synthetic

GROUP_CHUNK_BATCHES = 50
"""Length grouping sorts within chunks of this many batches (HF's megabatches use 50)."""


def load_splits(cfg: DictConfig, spec: TaskSpec) -> dict[str, list[Example]]:
    """{"train": [...], <each eval split>: [...]}, cut to train.max_train/eval_samples."""
    data_dir = None if spec.name == "synthetic" else glue_data_dir(cfg, spec)
    if spec.name == "synthetic":
        task = cfg.task
        splits = make_synthetic(task.num_train, task.num_eval, cfg.seed, task.min_words, task.max_words)
    else:
        splits = load_glue(spec, data_dir)
    limits = {"train": cfg.train.max_train_samples}
    limits.update({name: cfg.train.max_eval_samples for name in spec.eval_splits})
    splits = {name: splits[name][: limits[name]] if limits[name] else splits[name] for name in limits}
    _check_empty_texts(splits, spec, data_dir)
    if spec.is_regression:
        for name in spec.eval_splits:
            scores = {example.label for example in splits[name]}
            if len(scores) == 1:
                # A correlation with constant labels is undefined: it would be reported as 0, silently.
                raise DynbertError(f"every {name} score of {spec.name} is {scores.pop()}: a correlation with them "
                                   "is undefined; pass an evaluation set whose scores vary (or a larger "
                                   "train.max_eval_samples)")
    return splits


def _check_empty_texts(splits: dict[str, list[Example]], spec: TaskSpec, data_dir: str | None) -> None:
    """Count the examples whose text (or either text of a pair) is blank, per split: a split that is
    mostly such rows is refused (all-empty sentences trained a model on nothing, and its warnings
    blamed the learning rate); a few are kept, as GLUE's own files hold a few, and said on stderr."""
    columns = [column for column in (spec.text_columns if data_dir is None else spec.tsv_text_columns) if column]
    files = dict(zip(("train", *spec.eval_splits), ("train.tsv", *spec.tsv_eval_files)))
    for name, examples in splits.items():
        blank = Counter()
        rows = 0
        for example in examples:
            empty = [column for column, text in zip(columns, (example.text_a, example.text_b))
                     if not (text or "").strip()]
            blank.update(empty)
            rows += bool(empty)
        if not rows:
            continue
        where = "" if data_dir is None else f" ({Path(data_dir) / files[name]})"
        counts = " or ".join(f"{column!r}" + (f" ({blank[column]})" if len(blank) > 1 else "")
                             for column in columns if blank[column])
        what = f"{rows} of the {len(examples)} {name} examples of {spec.name}{where} have an empty {counts}"
        if 2 * rows > len(examples):
            raise DynbertError(f"{what}: a model would learn from or be scored on next to nothing; pass data "
                               "whose texts are filled in")
        if int(os.environ.get("RANK", "0")) == 0:  # several processes (torchrun): said once
            Console(stderr=True).print(f"[yellow]warning:[/] {escape(what)}; they are kept", highlight=False,
                                       soft_wrap=True)


@dataclass
class Encoded:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    """None for encoders without token types (RoBERTa, DistilBERT)."""
    labels: torch.Tensor
    cue_mask: list[list[bool]] | None
    """Synthetic only: which tokens belong to a cue word or its negator."""
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def head(self, count: int) -> Encoded:
        """The first ``count`` examples."""
        return Encoded(input_ids=self.input_ids[:count],
                       token_type_ids=None if self.token_type_ids is None else self.token_type_ids[:count],
                       labels=self.labels[:count], cue_mask=None if self.cue_mask is None else self.cue_mask[:count],
                       pad_id=self.pad_id)


def encode(examples: list[Example], tokenizer, max_length: int, spec: TaskSpec) -> Encoded:
    """Tokenize without padding (batches pad to their own longest input)."""
    # A pair task's texts are pairs even where the second text is empty: never single sentences.
    texts_b = [e.text_b or "" for e in examples] if spec.text_columns[1] is not None else None
    batch = tokenizer([e.text_a for e in examples], texts_b, truncation=True, max_length=max_length)
    label_dtype = torch.float if spec.is_regression else torch.long
    cue_mask = None
    if any(e.cue_words for e in examples):
        cue_mask = []
        for i, example in enumerate(examples):
            cues = set(example.cue_words)
            cue_mask.append([word in cues for word in batch.word_ids(i)])
    return Encoded(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"),
                   labels=torch.tensor([e.label for e in examples], dtype=label_dtype), cue_mask=cue_mask,
                   pad_id=tokenizer.pad_token_id)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None
    labels: torch.Tensor

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.token_type_ids),
                     move(self.labels))


def collate(data: Encoded, indices: list[int]) -> Batch:
    """The examples at ``indices``, right-padded to the longest of them."""
    longest = max(len(data.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), longest), data.pad_id, dtype=torch.long)
    types = torch.zeros((len(indices), longest), dtype=torch.long) if data.token_type_ids is not None else None
    mask = torch.zeros((len(indices), longest), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        if types is not None:
            types[row, :n] = torch.tensor(data.token_type_ids[i])
        mask[row, :n] = 1
    return Batch(ids, mask, types, data.labels[indices])


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """The training batches of one epoch, in order: a pure function of its arguments.

    Shuffled with a generator seeded by (seed, epoch). With ``group_by_length``, each chunk of
    ``GROUP_CHUNK_BATCHES`` batches is sorted by length before it is cut into batches, and the
    batches are then shuffled again, so lengths do not follow a long-to-short pattern in time.
    """
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    chunk = batch_size * GROUP_CHUNK_BATCHES
    batches = []
    for start in range(0, len(order), chunk):
        members = sorted(order[start:start + chunk], key=lambda i: lengths[i], reverse=True)
        batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]
