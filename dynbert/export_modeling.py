"""A dynbert run's pruned classifier, for transformers alone: `dynbert export` writes this file as
``modeling_dynbert.py`` beside the weights, and the folder's config.json points ``auto_map`` at it.

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    pipeline("text-classification", model=folder, trust_remote_code=True)

Only torch and transformers are imported (dynbert need not be installed). Each class is the
family's own transformers classifier, its weights named as there, with a forward that does what
dynbert's hard mode does (``dynbert/core.py``, ``GatedModel.forward(hard=True)``): after each pruned
layer's self-attention the tokens are scored (attention received, or CLS's attention), the run's
decision rule (``config.dynbert``) picks the tokens to keep (CLS always), and the kept tokens are
gathered in their original order, padded to the batch's longest, so later layers run on shorter
sequences. The same forward exports to ONNX (``torch.onnx.export``, dynamo): every kept count is
computed in the graph.

``config.dynbert`` holds, per pruned layer (``layers``): ``rule`` and its values (``open`` rank
table: gates; ``retention``: PoWER-BERT's k; ``relative`` ranks for both; ``thresholds`` and ``num_heads``:
LTP; ``counts`` by input length: top-k and random, random's ``hash_states``), ``score``, the
``max_length`` the rule covers, and ``keeps_all_up_to``: inputs this short keep every token, so
the layer need not score them (dynbert skips them too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import (AttentionInterface, BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, ElectraConfig, ElectraForSequenceClassification,
                          RobertaConfig, RobertaForSequenceClassification)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import SequenceClassifierOutput

ATTENTION = "dynbert_pruned"
RULES = ("none", "rank_table", "retention", "threshold", "length_table", "random")
_TABLE_DTYPES = dict(open=torch.bool, retention=torch.long, thresholds=torch.float32, counts=torch.long,
                     hash_states=torch.long)


def _sdpa(query, key, value, attention_mask, dropout, scaling):
    """transformers' sdpa attention as it runs for these encoders (a mask always given, no grouped
    heads), written out: its wrapper asks whether the length is > 1, which an exported graph, whose
    lengths are computed, cannot answer."""
    if torch.compiler.is_exporting():  # the same mask; torch.export cannot broadcast a computed length
        attention_mask = attention_mask.expand(-1, -1, query.size(2), -1)
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                              dropout_p=dropout, scale=scaling, is_causal=False)
    return output.transpose(1, 2).contiguous()


def _scoring_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, token_score=None,
                       score_queries=None, **kwargs):
    """sdpa, or attention that also returns each token's score (dynbert's kernel, computed alike)."""
    if token_score is None:
        return _sdpa(query, key, value, attention_mask, dropout, scaling), None
    if token_score == "attention_received":
        probs = torch.softmax(torch.matmul(query, key.transpose(2, 3)) * scaling + attention_mask, dim=-1)
        output = torch.matmul(torch.nn.functional.dropout(probs, p=dropout, training=module.training), value)
        score = (probs * score_queries[:, None, :, None]).sum(dim=(1, 2))
        return output.transpose(1, 2).contiguous(), score
    cls_logits = torch.matmul(query[:, :, :1], key.transpose(2, 3)) * scaling + attention_mask
    return _sdpa(query, key, value, attention_mask, dropout, scaling), torch.softmax(cls_logits, dim=-1).sum(dim=(1, 2))


AttentionInterface.register(ATTENTION, _scoring_attention)
# The family's own forward (model.bert(...), say) must still build padding masks under this name.
AttentionMaskInterface.register(ATTENTION, sdpa_mask)

_MASK32 = 0xFFFFFFFF
_MULTIPLIERS = (0x7FEB352D, 0x5BD1E995)


def _mix(value):
    """dynbert's 32-bit hash step on non-negative values below 2**32, written with // and % instead
    of >> and & (equal there) because ONNX shifts take unsigned types only."""
    for multiplier in _MULTIPLIERS:
        value = ((value ^ (value // 65536)) * multiplier) % (_MASK32 + 1)
    return value ^ (value // 65536)


def hash_state(seed: int, layer: int) -> int:
    """Random's per-layer hash state, as ``dynbert.methods.random_tokens.token_hash`` starts it."""
    return _mix((seed * 1_000_003 + layer) & _MASK32)


def _rank(score, present, cls_key):
    """Rank of each token: CLS first, then present tokens by score (ties: original order), then the rest.
    ``cls_key``: (batch, 1) of +inf, made once per forward.

    dynbert ranks by a stable sort. An exported graph ranks by ONNX TopK, which breaks ties by the
    lower index first, i.e. as a stable sort does; its inverse permutation is a second TopK over
    distinct values. Two nodes, where counting pairwise comparisons took a dozen.
    """
    key = torch.where(present, score, -1.0)
    key = torch.cat([cls_key, key[:, 1:]], dim=1)
    if torch.compiler.is_exporting():
        order = torch.topk(key, key.size(1), dim=1).indices
        return torch.topk(order, order.size(1), dim=1, largest=False).indices
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    return torch.argsort(order, dim=1)


def _keeping_rank_zero(name, values):
    """A ranking rule's values with rank 0 kept: ``_rank`` gives CLS rank 0 always, and dynbert keeps
    CLS whatever the rule says, so the rule keeps it here without a step of its own in the graph."""
    if name == "open":  # per layer, entry 0 open
        return [[True] + list(row[1:]) for row in values]
    if name == "retention":  # per layer, at least one token
        return [max(int(value), 1) for value in values]
    if name == "counts":  # per layer and input length, at least one token
        return [[max(int(value), 1) for value in row] for row in values]
    return values


def _gather_kept(hidden, keep, positions):
    """Drop tokens: the kept ones in their original order, padded to the most any row keeps.
    Returns the gathered (hidden, alive, positions) and each row's count of kept tokens."""
    count = keep.sum(dim=1)
    longest = count.max()
    if torch.compiler.is_exporting():
        # In an exported graph the kept count is data: a size the graph computes, not a constant.
        longest = longest.item()
        torch._check(longest >= 1)
        torch._check(longest <= keep.size(1))
    else:
        longest = int(longest)
    # Kept tokens first, each group in its original order, as dynbert's stable sort orders them.
    batch, length, width = hidden.shape
    if torch.compiler.is_exporting():  # ONNX TopK puts equal values in index order: kept first, each group in order
        kept_first = torch.topk(keep.to(torch.float32), longest, dim=1)
        index, alive = kept_first.indices, kept_first.values.bool()
    else:
        index = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :longest]
        alive = keep.gather(1, index)
    # Whole rows of the flattened batch (ONNX Gather), not an index per element (GatherElements).
    rows = (index + torch.arange(batch, device=keep.device)[:, None] * length).reshape(-1)
    hidden = hidden.reshape(-1, width).index_select(0, rows).view(batch, index.size(1), width)
    return hidden, alive, positions.gather(1, index), count


@dataclass
class PrunedClassifierOutput(SequenceClassifierOutput):
    """``logits`` (and ``loss`` with labels), and ``kept``: (batch, layers) tokens left after each layer."""

    kept: torch.Tensor | None = None


class _PrunedForward:
    """The hard-mode forward shared by every family; a family says how to embed, attend, feed forward, classify."""

    has_token_types = True

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        rule = config.dynbert
        if rule["rule"] not in RULES:
            raise ValueError(f"unknown pruning rule {rule['rule']!r}: this file knows {', '.join(RULES)}")
        self.rule = rule["rule"]
        self.score_name = rule.get("score")
        self.max_length = rule["max_length"]
        self.row = {layer: row for row, layer in enumerate(rule["layers"])}
        self.keeps_all_up_to = rule["keeps_all_up_to"]
        self.relative = rule.get("relative", False)
        self.num_heads = rule.get("num_heads")
        self._tables = {}
        config._attn_implementation = ATTENTION

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, return_dict=None, **kwargs):
        batch, length = input_ids.shape
        if not torch.compiler.is_exporting() and length > self.max_length:
            raise ValueError(f"input of {length} tokens, but this pruned model was trained for at most "
                             f"{self.max_length}: tokenize with truncation=True")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self._embed(input_ids, token_type_ids if self.has_token_types else None)
        real = attention_mask.bool()
        num_tokens = real.sum(dim=1)
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        # Columns that are padding in every example cost time: drop them first, as dynbert does.
        hidden, alive, positions, count = _gather_kept(hidden, real, positions)
        cls_key = torch.full((batch, 1), math.inf, dtype=hidden.dtype, device=hidden.device)
        kept = []
        for index, layer in enumerate(self._encoder_layers()):
            row = self.row.get(index)
            if row is not None and self._keeps_all(row, hidden.size(1)):
                row = None
            bias = torch.where(alive, 0.0, torch.finfo(hidden.dtype).min).to(hidden.dtype)[:, None, None, :]
            scoring = row is not None and self.rule != "random"  # random ranks by a hash, not a score
            score_kwargs = dict(token_score=self.score_name, score_queries=alive.to(hidden.dtype)) if scoring else {}
            attended, score = self._attention(layer, hidden, bias, **score_kwargs)
            if row is not None:
                present = count[:, None].clamp(min=1)
                decision = self._decide(row, score, alive, present, positions, input_ids, num_tokens, cls_key)
                if self.rule == "threshold":  # the ranking rules keep rank 0, CLS, through their tables
                    decision = torch.cat([torch.ones_like(decision[:, :1]), decision[:, 1:]], dim=1)
                keep = alive & decision
                attended, alive, positions, count = _gather_kept(attended, keep, positions)
            hidden = self._feed_forward(layer, attended)
            kept.append(count)
        logits = self._head(hidden)
        loss = None if labels is None else self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        output = PrunedClassifierOutput(loss=loss, logits=logits, kept=torch.stack(kept, dim=1))
        return output if return_dict is not False else output.to_tuple()

    def _keeps_all(self, row, length):
        """Whether the layer keeps every token of a ``length``-long (gathered) input. An exported graph
        has one path for every length: there only a layer that keeps any input whole is skipped."""
        up_to = self.keeps_all_up_to[row]
        return up_to >= self.max_length if torch.compiler.is_exporting() else up_to >= length

    def _table(self, name, device):
        """The rule's values ``name`` as a tensor on ``device``. Made on first use, not in __init__:
        from_pretrained builds the model on the meta device, where a tensor made there holds nothing."""
        def make():
            return torch.tensor(_keeping_rank_zero(name, self.config.dynbert[name]), dtype=_TABLE_DTYPES[name],
                                device=device)

        if torch.compiler.is_exporting():  # a constant of the graph; a traced tensor must not be kept
            return make()
        key = (name, device)
        if key not in self._tables:
            self._tables[key] = make()
        return self._tables[key]

    def _decide(self, row, score, alive, present, positions, input_ids, num_tokens, cls_key):
        """(batch, length) bool: the tokens the rule keeps at pruned layer ``row`` (CLS is kept anyway);
        ``present``: (batch, 1) the tokens still there, at least 1."""
        if self.rule == "rank_table":
            index = _rank(score, alive, cls_key)
            if self.relative:  # rank r of the n present meets entry floor(r·N/n): a share of each input
                index = (index * self.max_length).div(present, rounding_mode="floor").clamp(max=self.max_length - 1)
            return self._table("open", alive.device)[row][index]
        if self.rule == "retention":
            rank, retention = _rank(score, alive, cls_key), self._table("retention", alive.device)[row]
            if self.relative:  # the first k/N of the ranked tokens: floor(r·N/n) < k, i.e. r·N < k·n
                return rank * self.max_length < retention * present
            return rank < retention
        if self.rule == "threshold":
            return score / (self.num_heads * present) >= self._table("thresholds", alive.device)[row]
        if self.rule == "random":
            token_ids = input_ids.gather(1, positions)
            state = _mix(self._table("hash_states", alive.device)[row] ^ positions)
            score = (_mix(state ^ token_ids) // 256).float() / 2**24
        return _rank(score, alive, cls_key) < self._table("counts", alive.device)[row][num_tokens][:, None]


# Each family's config under a model_type of its own: transformers then loads the folder only with
# trust_remote_code=True (never silently un-pruned as the plain family), and a pipeline knows the class.


class DynbertBertConfig(BertConfig):
    model_type = "dynbert_bert"


class DynbertRobertaConfig(RobertaConfig):
    model_type = "dynbert_roberta"


class DynbertElectraConfig(ElectraConfig):
    model_type = "dynbert_electra"


class DynbertDistilBertConfig(DistilBertConfig):
    model_type = "dynbert_distilbert"


class _SharedLayout:
    """BERT, RoBERTa and ELECTRA layers: an attention sub-layer and ``feed_forward_chunk``."""

    def _attention(self, layer, hidden, bias, **score_kwargs):
        return layer.attention(hidden, bias, **score_kwargs)

    def _feed_forward(self, layer, attended):
        return layer.feed_forward_chunk(attended)


class DynbertBertForSequenceClassification(_PrunedForward, _SharedLayout, BertForSequenceClassification):
    config_class = DynbertBertConfig

    def _encoder_layers(self):
        return self.bert.encoder.layer

    def _embed(self, input_ids, token_type_ids):
        return self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def _head(self, hidden):
        return self.classifier(self.dropout(self.bert.pooler(hidden)))


class DynbertRobertaForSequenceClassification(_PrunedForward, _SharedLayout, RobertaForSequenceClassification):
    config_class = DynbertRobertaConfig
    has_token_types = False

    def _encoder_layers(self):
        return self.roberta.encoder.layer

    def _embed(self, input_ids, token_type_ids):
        return self.roberta.embeddings(input_ids=input_ids)

    def _head(self, hidden):
        return self.classifier(hidden)


class DynbertElectraForSequenceClassification(_PrunedForward, _SharedLayout, ElectraForSequenceClassification):
    config_class = DynbertElectraConfig

    def _encoder_layers(self):
        return self.electra.encoder.layer

    def _embed(self, input_ids, token_type_ids):
        hidden = self.electra.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        if hasattr(self.electra, "embeddings_project"):  # ELECTRA-small embeds narrower than its layers
            hidden = self.electra.embeddings_project(hidden)
        return hidden

    def _head(self, hidden):
        return self.classifier(hidden)


class DynbertDistilBertForSequenceClassification(_PrunedForward, DistilBertForSequenceClassification):
    config_class = DynbertDistilBertConfig
    has_token_types = False

    def _encoder_layers(self):
        return self.distilbert.transformer.layer

    def _embed(self, input_ids, token_type_ids):
        return self.distilbert.embeddings(input_ids)

    def _attention(self, layer, hidden, bias, **score_kwargs):
        output, score = layer.attention(hidden, bias, **score_kwargs)
        return layer.sa_layer_norm(output + hidden), score

    def _feed_forward(self, layer, attended):
        return layer.output_layer_norm(layer.ffn(attended) + attended)

    def _head(self, hidden):
        return self.classifier(self.dropout(self.pre_classifier(hidden[:, 0]).relu()))


CLASSES = {"bert": DynbertBertForSequenceClassification, "roberta": DynbertRobertaForSequenceClassification,
           "electra": DynbertElectraForSequenceClassification,
           "distilbert": DynbertDistilBertForSequenceClassification}
"""The exported class for each family's model_type (``auto_map`` names it and its ``config_class``)."""
