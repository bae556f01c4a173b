"""Build, save and load the gated model and its tokenizer."""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from .core import GatedModel
from .encoders import adapter_class, adapter_for, random_model, supported_model_types
from .methods import from_config
from .errors import FILE_MODE, DynbertError, first_line
from .hub import go_offline_if_unreachable
from .rundir import checksum_problem, write_checksums
from .tasks import TaskSpec

# save_pretrained's shard progress bar is noise in a CLI that draws its own progress.
hf_logging.disable_progress_bar()

METHOD_FILE = "method.safetensors"
WEIGHT_FILES = ("model.safetensors", METHOD_FILE)
CHECKSUM_FILE = "SHA256SUMS"
"""The weight files' sha256, recorded by save_model and checked by load_model (`sha256sum -c` reads it)."""
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


def build_model(model_cfg, spec: TaskSpec, max_length: int, train_texts: list[str]):
    """The classifier and its tokenizer: a tiny random encoder (``model.family``, BERT by default)
    with a WordPiece tokenizer trained on the task, or a local folder or hub name of any family in
    ``encoders`` (picked by its config.json's model_type).

    The config carries the task's label names (``id2label``), so a pipeline on the saved model
    answers "positive", not "LABEL_1".
    """
    labels = _label_config(spec)
    if model_cfg.name_or_path is None:
        tokenizer = train_wordpiece(train_texts, model_cfg.vocab_size)
        family = model_cfg.get("family", "bert")  # checked in config.validate
        # The tokenizer's pad id goes into the config: RoBERTa counts positions from it.
        model = random_model(family, hidden_size=model_cfg.hidden_size, num_layers=model_cfg.num_layers,
                             num_heads=model_cfg.num_heads, intermediate_size=model_cfg.intermediate_size,
                             vocab_size=len(tokenizer), max_positions=max(max_length, 128),
                             pad_token_id=tokenizer.pad_token_id, **labels)
        return model, tokenizer
    source = _resolve_pretrained(str(model_cfg.name_or_path))
    try:
        config = AutoConfig.from_pretrained(source)
        _check_family(source, config)
        _check_tokenizer_files(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        _check_tokenizer_size(source, tokenizer, config)
        adapter = adapter_class(config.model_type)
        # Mismatched shapes are reported in `info` (checked below), not raised as "look at the above
        # report!" about a report the quieted loader never printed.
        with _quiet_transformers():
            model, info = adapter.model_class.from_pretrained(source, output_loading_info=True,
                                                              ignore_mismatched_sizes=True, **labels)
    except DynbertError:
        raise
    except Exception as error:  # noqa: BLE001 - unreachable hub, truncated or foreign files: one sentence
        raise DynbertError(_cannot_load_message(source, error)) from error
    _check_loaded(source, info, adapter.new_head)
    return model, tokenizer


TOKENIZER_FILES = (("tokenizer.json",), ("vocab.txt",), ("vocab.json", "merges.txt"), ("spiece.model",))
"""A tokenizer is one of these sets of files (WordPiece's vocab.txt, byte-level BPE's vocab.json with
its merges.txt, ...); without them transformers would invent a tiny vocabulary."""


def _label_config(spec: TaskSpec) -> dict:
    if spec.is_regression:
        return dict(num_labels=1, problem_type="regression")
    id2label = dict(enumerate(spec.label_names))
    return dict(num_labels=spec.num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()})


def _check_family(source: str, config) -> None:
    if adapter_class(config.model_type) is None:
        raise DynbertError(f"model.name_or_path={source} is a '{config.model_type}' model; dynbert prunes "
                           f"{', '.join(supported_model_types())} models: pass a checkpoint of one of those")


def _check_tokenizer_files(source: str) -> None:
    """Before loading: transformers fails on a half tokenizer (vocab.json alone) with a message of its own."""
    folder = Path(source)
    if folder.is_dir() and not any(all((folder / name).is_file() for name in files) for files in TOKENIZER_FILES):
        expected = " or ".join(" with ".join(files) for files in TOKENIZER_FILES)
        raise DynbertError(f"model.name_or_path={source} has no tokenizer ({expected}): save the tokenizer "
                           "beside the weights (tokenizer.save_pretrained) and pass that folder")


def _check_tokenizer_size(source: str, tokenizer, config) -> None:
    if len(tokenizer) < config.vocab_size // 2:
        raise DynbertError(f"the tokenizer in {source} has {len(tokenizer)} tokens but the model "
                           f"{config.vocab_size}: pass a folder whose tokenizer belongs to its weights")


def _check_loaded(source: str, info: dict, new_head: tuple[str, ...]) -> None:
    """Only the new head may be missing: anything else would silently be random weights."""
    missing = sorted(key for key in info["missing_keys"] if not key.startswith(new_head))
    # (name, shape in the file, shape config.json asks for): a vocabulary resized in one but not the other.
    mismatched = sorted(f"{item[0]} {tuple(item[1])} where config.json makes {tuple(item[2])}"
                        if isinstance(item, tuple) and len(item) == 3 else str(item) for item in info["mismatched_keys"])
    if missing or mismatched:
        names = missing + mismatched
        listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise DynbertError(f"the encoder weights in {source} do not load ({len(missing)} missing, "
                           f"{len(mismatched)} of another shape: {listed}): pass a complete checkpoint "
                           "whose config.json matches its weights")


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints a load report for every new head; dynbert checks the report itself."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _resolve_pretrained(name_or_path: str) -> str:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if name_or_path.startswith(("/", ".", "~")) or path.exists() or name_or_path.count("/") > 1:
        raise DynbertError(f"model.name_or_path={name_or_path} is not a folder: pass a folder saved "
                           "with save_pretrained, a hub name, or model=tiny")
    go_offline_if_unreachable()
    return name_or_path


def _cannot_load_message(source: str, error: Exception) -> str:
    if Path(source).is_dir():
        return f"cannot load the model in {source} ({first_line(error)})"
    return (f"cannot load '{source}' from the Hugging Face hub (offline, or no such model there): "
            "pass model.name_or_path=<local folder saved with save_pretrained>, "
            "or run offline with model=tiny task=synthetic")


def make_gated_model(model, method_cfg, max_length: int) -> GatedModel:
    """Wrap the classifier with the pruning method the config asks for (method=none: nothing pruned)."""
    adapter = adapter_for(model)  # its family was checked when it was loaded
    positions = adapter.max_positions  # RoBERTa's 514 position embeddings take 512 tokens
    if max_length > positions:
        raise DynbertError(f"task.max_length={max_length} exceeds the model's {positions} positions: "
                           f"pass task.max_length={positions} or less")
    try:
        method = from_config(method_cfg, adapter, max_length)
        return GatedModel(model, method, mask_attention=method_cfg.mask_attention, encoder=adapter)
    except ValueError as error:
        raise DynbertError(f"bad method or model setting: {error}") from error


def save_model(gated: GatedModel, tokenizer, folder: Path) -> None:
    """HF layout (config.json, model.safetensors, tokenizer files) plus the method's state.

    Plain transformers loads ``folder`` as the un-pruned classifier; the pruning decisions (gates,
    thresholds, retention) are in ``method.safetensors`` and need dynbert.
    """
    folder.mkdir(parents=True, exist_ok=True)
    # A plain model when reloaded by others (transformers' sdpa, or the family's own where it has no sdpa).
    gated.model.config._attn_implementation = gated.encoder.plain_attention
    gated.model.save_pretrained(folder)
    gated.model.config._attn_implementation = gated.encoder.gated_attention
    tokenizer.save_pretrained(folder)
    state = {name: tensor.detach().contiguous() for name, tensor in gated.method.state_dict().items()}
    save_file(state, str(folder / METHOD_FILE), metadata={"method": gated.method.name})
    # safetensors writes its files 0600 whatever the umask: a colleague on a shared cluster must be
    # able to read the model as well as the metrics.
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(FILE_MODE)
    write_checksums(folder / CHECKSUM_FILE, [folder / name for name in WEIGHT_FILES])


def load_model(folder: Path, method_cfg, max_length: int):
    """Reload what ``save_model`` wrote, checked against its checksums: the model-folder half of
    ``predictor.load``, the one run loader. Safetensors only: nothing is unpickled or executed."""
    weights = [folder / name for name in WEIGHT_FILES]
    if not all(path.is_file() for path in weights):
        raise DynbertError(f"{folder} holds no trained model ({' and '.join(WEIGHT_FILES)}); "
                           "train one with `dynbert train` first")
    # A model saved before dynbert recorded checksums has none: refusing it would strand every
    # earlier run, so it loads, guarded only by the finiteness check below.
    problem = checksum_problem(folder / CHECKSUM_FILE, weights) if (folder / CHECKSUM_FILE).is_file() else None
    if problem is not None:
        raise DynbertError(f"{problem[0]} is damaged ({problem[1]}): train the run again")
    try:
        config = AutoConfig.from_pretrained(folder)
        _check_family(str(folder), config)
        with _quiet_transformers():  # every weight must load: `_check_loaded` below, with no new head
            model, info = adapter_class(config.model_type).model_class.from_pretrained(
                folder, output_loading_info=True, ignore_mismatched_sizes=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        state = load_file(str(folder / METHOD_FILE))
    except DynbertError:
        raise
    except Exception as error:  # noqa: BLE001 - a truncated or corrupt file: the run is unusable
        raise DynbertError(f"the model in {folder} does not load ({error.__class__.__name__}: "
                           f"{first_line(error)}); train it again") from error
    _check_loaded(str(folder), info, ())
    _refuse_non_finite(weights[0], model.state_dict(), allow_infinite=False)
    # Hardened sigmoid gates are stored as ±inf (exactly 0 or 1): only a NaN is damage there.
    _refuse_non_finite(weights[1], state, allow_infinite=True)
    gated = make_gated_model(model, method_cfg, max_length)
    try:
        gated.method.load_state_dict(state)
    except RuntimeError as error:
        raise DynbertError(f"{folder / METHOD_FILE} does not fit method {method_cfg.name} "
                           f"({first_line(error)}): the run folder was changed by hand") from error
    gated.source = str(folder)
    return gated, tokenizer


def _refuse_non_finite(path: Path, tensors: dict, allow_infinite: bool) -> None:
    """A NaN weight (a damaged file, or a diverged run saved) makes every prediction NaN or arbitrary."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            bad = tensor.isnan() if allow_infinite else ~tensor.isfinite()
            if bad.any():
                raise DynbertError(f"{path} holds weights that are not finite ({int(bad.sum())} in {name}): "
                                   "the file is damaged or the run diverged; train the run again")
