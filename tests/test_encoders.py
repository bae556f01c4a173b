"""Every encoder family through the same checks: BERT, RoBERTa, DistilBERT, ELECTRA (and ELECTRA-small's
embedding projection), MPNet (a relative position bias, eager attention only).

A family is one row of FAMILIES; a pruning method one row of DROP_SOME. Models are random and tiny
(hidden 32, 3 layers, 2 heads, 16 positions), built with ``encoders.random_model``; tokenizers are
built here and saved beside the weights where the CLI needs a checkpoint folder.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import pre_tokenizers
from transformers import (AutoConfig, BertForMaskedLM, BertTokenizer, DistilBertForMaskedLM, DistilBertTokenizer,
                          ElectraForPreTraining, GPT2Config, GPT2Model, MPNetForMaskedLM, MPNetTokenizer,
                          RobertaForMaskedLM, RobertaTokenizer)

import dynbert.train as train_module
from dynbert.config import compose_config
from dynbert.core import baseline_kept, count_matmul_flops, flops_per_example
from dynbert.data import collate, encode
from dynbert.encoders import adapter_for, random_model, supported_model_types
from dynbert.errors import DynbertError
from dynbert.modeling import build_model, make_gated_model
from dynbert.tasks import Example, get_task
from dynbert.train import load_run

from glue_data import write_glue_run_folder
from helpers import FAST, SYNTHETIC, invoke, read_json, snapshot

HIDDEN, INTERMEDIATE, LAYERS, HEADS, POSITIONS, LABELS = 32, 64, 3, 2, 16, 3
LENGTHS = (12, 9, 5, 3)  # a padded batch of mixed lengths
SCORES = ("attention_received", "cls_attention")
TEXTS = ["a good film", "a bad film", "it is fine", "awful and dull", "good good good"]


@dataclass(frozen=True)
class Family:
    model_type: str
    model_option: str
    """The conf/model option of the family's pretrained model."""
    tokenizer_class: type
    base_prefix: str
    """Where the encoder's weights live in the *ForSequenceClassification model."""
    pretraining_class: type
    """The class of the family's checkpoints on the hub (masked LM, ELECTRA's discriminator)."""
    config: dict = field(default_factory=dict)
    attentions: tuple[str, ...] = ("sdpa", "eager")
    """The attention implementations transformers has for the family (the first is its default here)."""


FAMILIES = {
    "bert": Family("bert", "bert-base-uncased", BertTokenizer, "bert", BertForMaskedLM),
    "roberta": Family("roberta", "roberta-base", RobertaTokenizer, "roberta", RobertaForMaskedLM),
    "distilbert": Family("distilbert", "distilbert-base-uncased", DistilBertTokenizer, "distilbert",
                         DistilBertForMaskedLM),
    "electra": Family("electra", "electra-base-discriminator", BertTokenizer, "electra", ElectraForPreTraining),
    "electra-small": Family("electra", "electra-base-discriminator", BertTokenizer, "electra", ElectraForPreTraining,
                            config=dict(embedding_size=16)),  # embeds in 16 dimensions, projects to 32
    "mpnet": Family("mpnet", "mpnet-base", MPNetTokenizer, "mpnet", MPNetForMaskedLM, attentions=("eager",)),
}


# How a method is put into a state that drops some tokens; ``harden_`` then makes its decisions 0/1.
# Another method (power_bert, ltp, topk, random) is one more line here.
DROP_SOME = {
    "gates": lambda method, generator: method.gates.raw.copy_(
        torch.rand(method.gates.raw.shape, generator=generator) * 0.75 + 0.25),
}


def make_model(name: str, seed: int = 0, attn: str | None = None, init: float = 0.1, vocab_size: int = 100,
               positions: int = POSITIONS):
    """A random classifier of the family; weights wider than the usual 0.02 keep token scores apart.
    ``attn``: its attention implementation (default: the family's first, sdpa where it has one)."""
    torch.manual_seed(seed)
    model = random_model(FAMILIES[name].model_type, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                         intermediate_size=INTERMEDIATE, vocab_size=vocab_size, max_positions=positions,
                         num_labels=LABELS, initializer_range=init,
                         attn_implementation=attn or FAMILIES[name].attentions[0], **FAMILIES[name].config)
    return model.eval()


def require_attention(name: str, attn: str) -> None:
    if attn not in FAMILIES[name].attentions:
        pytest.skip(f"transformers has no {attn} attention for {FAMILIES[name].model_type}")


@functools.lru_cache
def _method_config(method: str, overrides: tuple[str, ...]):
    return compose_config([f"method={method}", *overrides]).method


def pruned(model, method: str = "gates", max_length: int = POSITIONS, **method_settings):
    """``model`` pruned by ``method`` as its shipped config sets it up (gates: all open)."""
    overrides = tuple(f"method.{key}={value}" for key, value in sorted(method_settings.items()))
    return make_gated_model(model, _method_config(method, overrides), max_length).eval()


def make_batch(model, lengths=LENGTHS, seed: int = 0, width: int | None = None):
    """Random ids (the first and last fixed, as CLS and SEP are), right-padded with the model's pad
    id; the second half of each input is segment B (for the families that read token types)."""
    generator = torch.Generator().manual_seed(seed)
    pad = model.config.pad_token_id
    width = max(lengths) if width is None else width
    input_ids = torch.full((len(lengths), width), pad)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    token_type_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = torch.randint(5, model.config.vocab_size, (n,), generator=generator)
        input_ids[row, 0], input_ids[row, n - 1] = 3, 4
        attention_mask[row, :n] = 1
        token_type_ids[row, n // 2:n] = 1
    return input_ids, attention_mask, token_type_ids


def hf_inputs(gated, input_ids, attention_mask, token_type_ids) -> dict:
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if gated.encoder.has_token_types:
        inputs["token_type_ids"] = token_type_ids
    return inputs


# ---------------------------------------------------------------------------------------------
# The adapter computes what the family's own model computes


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("reference_attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", FAMILIES)
def test_nothing_pruned_matches_the_familys_own_forward(name, reference_attn, score):
    require_attention(name, reference_attn)
    model = make_model(name, seed=1)
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = reference_attn
    gated = pruned(model, score=score)
    assert model.config._attn_implementation == gated.encoder.gated_attention
    assert reference.config._attn_implementation == reference_attn
    batch = make_batch(model, seed=1)
    with torch.no_grad():
        expected = reference(**hf_inputs(gated, *batch)).logits
        for hard in (False, True):
            out = gated(*batch, hard=hard)
            assert (out.logits - expected).abs().max() <= 1e-5, f"hard={hard}"
            assert torch.equal(out.kept, batch[1].sum(1, keepdim=True).expand(-1, LAYERS))


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("method", DROP_SOME)
@pytest.mark.parametrize("name", FAMILIES)
def test_hard_equals_soft_with_binary_decisions(name, method, score):
    gated = pruned(make_model(name, seed=2), method, score=score)
    batch = make_batch(gated.model, seed=2, width=POSITIONS)
    with torch.no_grad():
        DROP_SOME[method](gated.method, torch.Generator().manual_seed(2))
        gated.method.harden_()
        soft = gated(*batch, hard=False)
        hard = gated(*batch, hard=True)
    assert (hard.kept < hard.num_tokens[:, None]).any(), "nothing was dropped: the check would be empty"
    assert torch.equal(soft.kept, hard.kept) and torch.equal(soft.present, hard.present)
    assert (soft.logits - hard.logits).abs().max() <= 1e-4


# The peer methods, set as tests/test_methods.py sets them to drop part of most inputs of LENGTHS
# (ToMe merges that part instead).
PEERS = {"power_bert": {}, "ltp": {"threshold": 0.1}, "topk": {"keep": 0.4}, "random": {"keep": 0.4},
         "tome": {"keep": 0.4}}


@pytest.mark.parametrize("method", PEERS)
@pytest.mark.parametrize("name", FAMILIES)
def test_hard_equals_soft_for_every_peer_method(name, method):
    gated = pruned(make_model(name, seed=6), method, **PEERS[method])
    with torch.no_grad():
        if method == "power_bert":  # retention weights around 0.5: k_l near half the ranks
            raw = gated.method.retention_weights.raw
            raw.copy_(torch.rand(raw.shape, generator=torch.Generator().manual_seed(6)))
        gated.method.harden_()
        batch = make_batch(gated.model, seed=6)
        soft = gated(*batch, hard=False)
        hard = gated(*batch, hard=True)
    assert (hard.kept < hard.num_tokens[:, None]).any(), "nothing was dropped: the check would be empty"
    assert torch.equal(soft.kept, hard.kept) and torch.equal(soft.present, hard.present)
    assert (soft.logits - hard.logits).abs().max() <= 1e-4


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("name", FAMILIES)
def test_token_scores_are_the_familys_own_attention_probabilities(name, score):
    """The kernel scores what the family's eager attention computes (MPNet: its relative position
    bias included, per query): the first layer's score is its probabilities summed over heads and
    the real queries (attention received) or over heads in the first query's row (CLS attention)."""
    model = make_model(name, seed=7)
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "eager"
    gated = pruned(model, score=score)
    input_ids, attention_mask, token_type_ids = batch = make_batch(model, seed=7)
    with torch.no_grad():
        scores = gated(*batch, return_scores=True).scores[:, 0]
        probs = reference(**hf_inputs(gated, *batch), output_attentions=True).attentions[0]
    queries = attention_mask[:, None, :, None] if score == "attention_received" else torch.zeros_like(probs)
    if score == "cls_attention":
        queries[:, :, 0] = 1
    expected = (probs * queries).sum(dim=(1, 2))
    real = attention_mask.bool()
    assert (scores[real] - expected[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("name", FAMILIES)
def test_example_alone_equals_example_in_padded_batch(name, hard):
    """Right padding changes nothing (RoBERTa counts positions over the non-pad tokens)."""
    gated = pruned(make_model(name, seed=3))
    with torch.no_grad():  # fractional gates: soft mode scales, hard mode keeps g >= 0.5
        gated.method.gates.raw.copy_(torch.rand(gated.method.gates.raw.shape,
                                                generator=torch.Generator().manual_seed(3)) * 0.6 + 0.3)
    input_ids, attention_mask, token_type_ids = make_batch(gated.model, seed=3, width=POSITIONS)
    with torch.no_grad():
        together = gated(input_ids, attention_mask, token_type_ids, hard=hard)
        for row, n in enumerate(LENGTHS):
            alone = gated(input_ids[row:row + 1, :n], attention_mask[row:row + 1, :n],
                          token_type_ids[row:row + 1, :n], hard=hard)
            assert (alone.logits[0] - together.logits[row]).abs().max() <= 1e-5, f"row {row}"
            assert torch.equal(alone.kept[0], together.kept[row])
    assert (together.kept < together.num_tokens[:, None]).any()


# ---------------------------------------------------------------------------------------------
# FLOPs: the formula (with each family's head and embedding projection) agrees with torch's counter


def _rel(a, b) -> float:
    return abs(float(a) - float(b)) / float(b)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", FAMILIES)
def test_baseline_flops_match_counter_on_the_familys_own_model(name, attn):
    require_attention(name, attn)
    model = make_model(name, seed=4, attn=attn)
    dims = adapter_for(model).dims
    for n in (16, 7):
        input_ids, attention_mask, _ = make_batch(model, lengths=(n,), seed=n)
        counted = count_matmul_flops(model, input_ids=input_ids, attention_mask=attention_mask)
        num_tokens = attention_mask.sum(dim=1)
        analytic = flops_per_example(num_tokens, baseline_kept(num_tokens, LAYERS), dims)
        assert _rel(analytic[0], counted) <= 0.01, f"length {n}: analytic {float(analytic[0])}, counted {counted}"


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("name", FAMILIES)
def test_pruned_flops_match_counter(name, score):
    gated = pruned(make_model(name, seed=5), score=score, ranks="absolute")  # gate j is rank j's
    input_ids, attention_mask, token_type_ids = make_batch(gated.model, lengths=(13,), seed=5)
    for ks in ([16, 16, 16], [6, 6, 6], [10, 6, 3], [9, 9, 2], [1, 1, 1]):
        with torch.no_grad():  # layer l keeps ranks below ks[l]
            gated.method.gates.raw.fill_(1.0)
            for row, k in enumerate(ks):
                gated.method.gates.raw[row, k:] = 0.0
            out = gated(input_ids, attention_mask, token_type_ids, hard=True)
        expected = [min([13, *ks[:layer + 1]]) for layer in range(LAYERS)]
        assert out.kept[0].tolist() == expected
        analytic = gated.flops(out)[0]
        counted = count_matmul_flops(gated, input_ids, attention_mask, token_type_ids, hard=True)
        assert _rel(analytic[0], counted) <= 0.01, f"schedule {ks}: analytic {float(analytic[0])}, counted {counted}"


def test_electra_small_counts_its_embedding_projection():
    dims = pruned(make_model("electra-small")).encoder.dims
    assert dims.embed_macs_per_token == 16 * HIDDEN
    assert pruned(make_model("electra")).encoder.dims.embed_macs_per_token == 0


# ---------------------------------------------------------------------------------------------
# What the training loop asks of an adapter


@pytest.mark.parametrize("name", FAMILIES)
def test_random_model_has_the_sizes_asked_for(name):
    encoder = pruned(make_model(name, vocab_size=77, positions=20), max_length=20).encoder
    dims = encoder.dims
    assert (dims.hidden, dims.intermediate, dims.num_layers, encoder.num_heads) == (HIDDEN, INTERMEDIATE, LAYERS, HEADS)
    assert encoder.max_positions == 20 and encoder.model.config.vocab_size == 77
    assert len(encoder.layers) == LAYERS
    assert encoder.model.config.model_type == FAMILIES[name].model_type


@pytest.mark.parametrize("name", FAMILIES)
def test_the_tiny_model_takes_any_family_offline(name):
    """`model=tiny model.family=<family>`: each family trains from scratch with no download, its
    config's pad id the trained tokenizer's (RoBERTa counts positions from it)."""
    cfg = compose_config(["model=tiny", f"model.family={FAMILIES[name].model_type}", "task=synthetic"])
    texts = ["a good film", "not a good film", "an awful film"] * 20
    model, tokenizer = build_model(cfg.model, get_task("synthetic"), 32, texts)
    encoder = adapter_for(model)
    assert model.config.model_type == FAMILIES[name].model_type and encoder.max_positions >= 128
    assert model.config.pad_token_id == tokenizer.pad_token_id and model.config.vocab_size == len(tokenizer)


def test_a_tiny_model_of_an_unsupported_family_is_refused_before_any_work():
    with pytest.raises(DynbertError, match=f"model.family=gpt2 is not valid: pass one of {', '.join(supported_model_types())}$"):
        compose_config(["model=tiny", "model.family=gpt2"])


def test_random_model_of_an_unknown_family_names_the_supported_ones():
    with pytest.raises(ValueError, match=f"'gpt2'; supported: {', '.join(supported_model_types())}$"):
        random_model("gpt2", hidden_size=HIDDEN, num_layers=1, num_heads=HEADS, intermediate_size=INTERMEDIATE,
                     vocab_size=100, max_positions=POSITIONS)


@pytest.mark.parametrize("name", FAMILIES)
def test_no_weight_decay_on_biases_and_norms(name):
    """Norms by every family's names: BERT's LayerNorm, DistilBERT's sa_layer_norm and output_layer_norm."""
    encoder = pruned(make_model(name)).encoder
    names = [param_name for param_name, _ in encoder.model.named_parameters()]
    norm_or_bias = [param_name for param_name in names
                    if param_name.endswith("bias") or re.search(r"(LayerNorm|layer_norm)\.weight$", param_name)]
    assert [param_name for param_name in names if encoder.no_decay(param_name)] == norm_or_bias
    assert any("LayerNorm" in param_name or "layer_norm" in param_name for param_name in norm_or_bias)
    assert any(param_name.endswith("word_embeddings.weight") for param_name in names if not encoder.no_decay(param_name))


def test_roberta_takes_two_positions_fewer_than_it_has_embeddings():
    model = make_model("roberta")
    assert model.config.max_position_embeddings == POSITIONS + 2  # padding_idx 1, positions from 2
    pruned(model, max_length=POSITIONS)
    with pytest.raises(DynbertError, match=f"task.max_length={POSITIONS + 1} exceeds the model's {POSITIONS} positions"):
        pruned(make_model("roberta"), max_length=POSITIONS + 1)


# ---------------------------------------------------------------------------------------------
# Checkpoint folders: tokenizers, the weights a pretrained checkpoint has, refusals


# Byte-level BPE as RoBERTa's: every byte a token, and merges that spell " good".
BPE_MERGES = [("Ġ", "g"), ("o", "o"), ("Ġg", "oo"), ("Ġgoo", "d")]
BPE_VOCAB = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>",
                                                 *sorted(pre_tokenizers.ByteLevel.alphabet()),
                                                 *("".join(pair) for pair in BPE_MERGES)])}


def family_tokenizer(name: str):
    """A tiny tokenizer of the family's own kind: WordPiece (BERT, DistilBERT, ELECTRA, MPNet) or
    byte-level BPE (RoBERTa)."""
    family = FAMILIES[name]
    if family.tokenizer_class is RobertaTokenizer:
        return RobertaTokenizer(vocab=BPE_VOCAB, merges=BPE_MERGES)
    words = sorted({word for text in TEXTS for word in text.split()})
    characters = sorted({character for word in words for character in word})
    # MPNet's WordPiece has RoBERTa's special tokens, <pad> at id 1 (the id its embeddings skip).
    specials = (["<s>", "<pad>", "</s>", "[UNK]", "<mask>"] if family.tokenizer_class is MPNetTokenizer
                else ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    vocab = [*specials, *characters, *(f"##{c}" for c in characters),
             *(word for word in words if len(word) > 1)]
    return family.tokenizer_class(vocab={token: i for i, token in enumerate(vocab)})


def save_checkpoint(folder: Path, name: str, kind: str = "encoder", vocab_size: int | None = None) -> Path:
    """A pretrained checkpoint and the family's tokenizer. ``kind``: "encoder" (the encoder alone, as
    ``*Model`` saves it) or "pretraining" (the hub's class, with its masked-LM or discriminator head).
    ``vocab_size``: the model's, if not the tokenizer's. RoBERTa's tokenizer is saved as vocab.json +
    merges.txt, as the hub has it."""
    tokenizer = family_tokenizer(name)
    classifier = make_model(name, vocab_size=vocab_size or len(tokenizer))
    if kind == "encoder":
        getattr(classifier, FAMILIES[name].base_prefix).save_pretrained(folder)
    else:
        FAMILIES[name].pretraining_class(classifier.config).save_pretrained(folder)
    if isinstance(tokenizer, RobertaTokenizer):
        (folder / "vocab.json").write_text(json.dumps(BPE_VOCAB))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in BPE_MERGES))
    else:
        tokenizer.save_pretrained(folder)
    return folder


def build_from(folder: Path, task: str = "sst2"):
    cfg = compose_config([f"model.name_or_path={folder}"])
    return build_model(cfg.model, get_task(task), POSITIONS, TEXTS)


@pytest.mark.parametrize("kind", ["encoder", "pretraining"])
@pytest.mark.parametrize("name", FAMILIES)
def test_pretrained_checkpoint_loads_into_the_classifier_with_only_the_head_new(tmp_path, name, kind):
    folder = save_checkpoint(tmp_path / name, name, kind)
    prefix = FAMILIES[name].base_prefix
    saved = {key if kind == "pretraining" else f"{prefix}.{key}": tensor
             for key, tensor in load_file(str(folder / "model.safetensors")).items()}
    model, tokenizer = build_from(folder)
    assert type(model) is make_model(name).__class__
    assert model.config.model_type == FAMILIES[name].model_type and model.config.num_labels == 2
    encoder_weights = {key: tensor for key, tensor in model.state_dict().items() if key.startswith(f"{prefix}.")}
    # Every encoder weight came from the checkpoint (BERT's pooler too, where it has one).
    assert encoder_weights.keys() - saved.keys() <= {f"{prefix}.pooler.dense.weight", f"{prefix}.pooler.dense.bias"}
    for key in encoder_weights.keys() & saved.keys():
        assert torch.equal(encoder_weights[key], saved[key]), key
    assert len(tokenizer) == model.config.vocab_size


@pytest.mark.parametrize("name", FAMILIES)
def test_tokenizer_of_each_family_encodes_pairs_and_batches_pad_with_its_pad_id(tmp_path, name):
    model, tokenizer = build_from(save_checkpoint(tmp_path / name, name), task="rte")
    examples = [Example("a good film", "it is fine", 0), Example("awful", "a bad film and dull", 1)]
    data = encode(examples, tokenizer, POSITIONS, get_task("rte"))
    gated = pruned(model)
    reads_types = gated.encoder.has_token_types
    assert (data.token_type_ids is not None) == reads_types  # RoBERTa's and DistilBERT's tokenizers give none
    batch = collate(data, [0, 1])
    assert data.pad_id == model.config.pad_token_id
    assert (batch.input_ids[batch.attention_mask == 0] == model.config.pad_token_id).all()
    with torch.no_grad():
        out = gated(batch.input_ids, batch.attention_mask, batch.token_type_ids, hard=True)
        expected = model(**hf_inputs(gated, batch.input_ids, batch.attention_mask, batch.token_type_ids)).logits
    assert (out.logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_tokenizer_of_another_vocabulary_is_refused(tmp_path, name):
    tokens = len(family_tokenizer(name))
    folder = save_checkpoint(tmp_path / name, name, vocab_size=4 * tokens)
    with pytest.raises(DynbertError, match=f"has {tokens} tokens but the model {4 * tokens}"):
        build_from(folder)


def test_roberta_vocab_without_merges_is_no_tokenizer(tmp_path):
    folder = save_checkpoint(tmp_path / "roberta", "roberta")
    assert build_from(folder)[1]("a good film")["input_ids"][:3] == [0, 69, 264]  # <s> a Ġgood
    (folder / "merges.txt").unlink()
    with pytest.raises(DynbertError, match="has no tokenizer .*vocab.json with merges.txt"):
        build_from(folder)


def _cli_refusal(tmp_path, *args):
    """`dynbert train ARGS` must exit 2 with one line and no traceback, change no file and write no
    model, checkpoint or metrics (the run folder keeps only its config, as for any early failure)."""
    before = snapshot(tmp_path)
    result = invoke("train", "debug=fast", *args, f"output_dir={tmp_path / 'run'}")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    after = snapshot(tmp_path)
    assert {path: after.get(path) for path in before} == before
    assert {path for path in after if path not in before} <= {"run/config.yaml", "run/.dynbert-run", "run/train.log"}
    return lines[0]


def test_unsupported_family_is_refused_naming_the_supported_ones(tmp_path):
    GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    message = _cli_refusal(tmp_path, f"model.name_or_path={tmp_path / 'gpt2'}")
    assert f"is a 'gpt2' model; dynbert prunes {', '.join(supported_model_types())} models" in message
    assert {family.model_type for family in FAMILIES.values()} <= set(supported_model_types())


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpoint_missing_encoder_weights_is_refused_naming_them(tmp_path, name):
    folder = save_checkpoint(tmp_path / name, name)
    weights = load_file(str(folder / "model.safetensors"))
    dropped = sorted(key for key in weights if key.startswith(("encoder.layer.1.", "transformer.layer.1."))
                     and key.endswith("weight"))[:1]
    save_file({key: value for key, value in weights.items() if key not in dropped}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    message = _cli_refusal(tmp_path, f"model={FAMILIES[name].model_option}", f"model.name_or_path={folder}")
    prefix = FAMILIES[name].base_prefix
    assert f"the encoder weights in {folder} do not load (1 missing, 0 of another shape: {prefix}.{dropped[0]})" in message


@pytest.mark.parametrize("name", FAMILIES)
def test_train_from_a_checkpoint_folder_of_each_family_and_reload(tmp_path, name, monkeypatch):
    folder = save_checkpoint(tmp_path / "checkpoint", name)
    glue = write_glue_run_folder(tmp_path / "glue", "sst2")
    run_dir = tmp_path / "run"
    trained = {}
    save_model = train_module.save_model

    def save_and_remember(gated, tokenizer, model_dir):
        """The model as training left it (hardened for evaluation), on inputs of its own tokenizer."""
        data = encode([Example(text, None, 0) for text in TEXTS], tokenizer, POSITIONS, get_task("sst2"))
        trained["batch"] = collate(data, list(range(len(TEXTS))))
        with torch.no_grad():
            trained["logits"] = gated(trained["batch"].input_ids, trained["batch"].attention_mask,
                                      trained["batch"].token_type_ids, hard=True).logits
        save_model(gated, tokenizer, model_dir)

    monkeypatch.setattr(train_module, "save_model", save_and_remember)
    result = invoke("train", "debug=fast", f"model={FAMILIES[name].model_option}", "task=sst2",
                    f"task.data_dir={glue}", f"model.name_or_path={folder}", "task.max_length=16",
                    "train.epochs=3", "method.start=0.3", "lambda=0.5", f"output_dir={run_dir}")
    assert result.exit_code == 0, result.output
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["steps"] == 3 and len(metrics["kept_per_layer"]) == LAYERS
    assert AutoConfig.from_pretrained(run_dir / "model").model_type == FAMILIES[name].model_type

    reloaded = load_run(run_dir)
    batch = trained["batch"]
    with torch.no_grad():
        logits = reloaded(batch.input_ids, batch.attention_mask, batch.token_type_ids, hard=True).logits
    assert torch.allclose(logits, trained["logits"], atol=1e-6)
    assert torch.equal(logits.argmax(-1), trained["logits"].argmax(-1))


def test_a_tiny_mpnet_trains_offline_and_export_refuses_it_naming_the_family(tmp_path):
    """`model=tiny model.family=mpnet` through the CLI; export's modeling file has no MPNet."""
    run_dir = tmp_path / "run"
    result = invoke("train", *FAST, *SYNTHETIC, "model.family=mpnet", "method.start=0", "method.lr=0.5", "lambda=1",
                    f"output_dir={run_dir}")
    assert result.exit_code == 0, result.output
    assert AutoConfig.from_pretrained(run_dir / "model").model_type == "mpnet"
    assert read_json(run_dir / "metrics.json")["flops_ratio"] < 1
    result = invoke("export", run_dir, "--out", tmp_path / "served")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "error: the export's modeling file has no mpnet model (it serves bert, distilbert, electra, roberta): "
        "use this run with `dynbert predict`"]
    assert not (tmp_path / "served").exists()


# ---------------------------------------------------------------------------------------------
# The shipped model configs and the commands docs/encoders.md gives


def _documented_commands() -> list[list[str]]:
    text = (Path(__file__).resolve().parent.parent / "docs" / "encoders.md").read_text()
    return [line.split("#")[0].split()[2:] for line in text.splitlines() if line.startswith("dynbert train ")]


def test_every_documented_command_composes_and_picks_a_hub_model_of_each_family():
    """The commands need the hub (or a local copy), so they are composed here, not run."""
    commands = _documented_commands()
    hub_names = {compose_config(command).model.name_or_path for command in commands}
    assert {"bert-base-uncased", "roberta-base", "distilbert-base-uncased",
            "google/electra-base-discriminator"} <= hub_names
    for family in FAMILIES.values():
        cfg = compose_config([f"model={family.model_option}", "task=sst2"])
        assert cfg.model.name == family.model_option and 0 < cfg.train.lr <= 1e-4
