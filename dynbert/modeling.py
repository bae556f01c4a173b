"""Build, save and load the gated model and its tokenizer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification,
                          PreTrainedTokenizerFast)
from transformers.utils import logging as hf_logging

from .core import GatedBert
from .errors import DynbertError, first_line
from .hub import go_offline_if_unreachable

# save_pretrained's shard progress bar is noise in a CLI that draws its own progress.
hf_logging.disable_progress_bar()

GATES_FILE = "gates.safetensors"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A BERT-style uncased WordPiece tokenizer for ``texts`` (the tiny model's), the same every time.

    The vocabulary: the special tokens, every character seen (alone and as a ``##`` continuation,
    so any word can be spelled; these even past ``vocab_size``), then the most frequent words, ties
    broken alphabetically, up to ``vocab_size``. tokenizers' own WordPieceTrainer breaks ties in
    hash order, so it learned a different vocabulary in each process (huggingface/tokenizers#1794):
    the same command trained a different model, and a resumed run did not match an uninterrupted one.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for text in texts
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = sorted({character for word in counts for character in word})
    vocab = SPECIAL_TOKENS + characters + [f"##{character}" for character in characters]
    words = sorted((word for word in counts if len(word) > 1), key=lambda word: (-counts[word], word))
    vocab += words[: max(0, vocab_size - len(vocab))]
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def build_model(model_cfg, num_labels: int, max_length: int, train_texts: list[str]):
    """The classifier and its tokenizer: a tiny random BERT, a local folder, or a hub name."""
    if model_cfg.name_or_path is None:
        tokenizer = train_wordpiece(train_texts, model_cfg.vocab_size)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=model_cfg.hidden_size,
                            num_hidden_layers=model_cfg.num_layers,
                            num_attention_heads=model_cfg.num_heads,
                            intermediate_size=model_cfg.intermediate_size,
                            max_position_embeddings=max(max_length, 128), num_labels=num_labels)
        return BertForSequenceClassification(config), tokenizer
    source = _resolve_pretrained(str(model_cfg.name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = BertForSequenceClassification.from_pretrained(source, num_labels=num_labels)
    except OSError as error:
        raise DynbertError(_cannot_load_message(source, error)) from error
    return model, tokenizer


def _resolve_pretrained(name_or_path: str) -> str:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if name_or_path.startswith(("/", ".", "~")) or path.exists() or name_or_path.count("/") > 1:
        raise DynbertError(f"model.name_or_path={name_or_path} is not a folder: pass a folder saved "
                           "with save_pretrained, a hub name, or model=tiny")
    go_offline_if_unreachable()
    return name_or_path


def _cannot_load_message(source: str, error: OSError) -> str:
    if Path(source).is_dir():
        return f"cannot load a BERT model from {source} ({first_line(error)})"
    return (f"cannot load '{source}' from the Hugging Face hub (offline, or not a BERT model there): "
            "pass model.name_or_path=<local folder saved with save_pretrained>, "
            "or run offline with model=tiny task=synthetic")


def make_gated(model: BertForSequenceClassification, gate_cfg, max_length: int) -> GatedBert:
    """Wrap the classifier with the gates the config asks for (gate=none: no gated layer)."""
    layers = list(gate_cfg.layers) if gate_cfg.layers is not None else None
    if not gate_cfg.enabled:
        layers = []
    # Checked here, not only in GatedBert, so the message names the key to change.
    num_layers, positions = model.config.num_hidden_layers, model.config.max_position_embeddings
    if layers and not all(0 <= layer < num_layers for layer in layers):
        raise DynbertError(f"gate.layers={layers} is out of range: the model has layers 0..{num_layers - 1}")
    if max_length > positions:
        raise DynbertError(f"task.max_length={max_length} exceeds the model's {positions} positions: "
                           f"pass task.max_length={positions} or less")
    try:
        return GatedBert(model, max_length=max_length, gate_layers=layers, score=gate_cfg.score,
                         parametrization=gate_cfg.parametrization,
                         mask_attention=gate_cfg.mask_attention, monotone=gate_cfg.monotone)
    except ValueError as error:
        raise DynbertError(f"bad gate or model setting: {error}") from error


def save_model(gated: GatedBert, tokenizer, folder: Path) -> None:
    """HF layout (config.json, model.safetensors, tokenizer files) plus the gates."""
    folder.mkdir(parents=True, exist_ok=True)
    gated.model.config._attn_implementation = "sdpa"  # a plain BERT when reloaded by others
    gated.model.save_pretrained(folder)
    gated.model.config._attn_implementation = "dynbert"
    tokenizer.save_pretrained(folder)
    save_file({"gates": gated.gates.raw.detach().contiguous()}, str(folder / GATES_FILE))


def load_model(folder: Path, gate_cfg, max_length: int):
    """Reload what ``save_model`` wrote. Safetensors only: nothing is unpickled or executed."""
    if not (folder / GATES_FILE).is_file() or not (folder / "model.safetensors").is_file():
        raise DynbertError(f"{folder} holds no trained model (model.safetensors and {GATES_FILE}); "
                           "train one with `dynbert train` first")
    model = BertForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    gated = make_gated(model, gate_cfg, max_length)
    raw = load_file(str(folder / GATES_FILE))["gates"]
    if raw.shape != gated.gates.raw.shape:
        raise DynbertError(f"{folder / GATES_FILE} holds gates of shape {tuple(raw.shape)}, "
                           f"the config asks for {tuple(gated.gates.raw.shape)}")
    with torch.no_grad():
        gated.gates.raw.copy_(raw)
    return gated, tokenizer
