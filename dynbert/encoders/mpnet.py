"""MPNet: BERT-shaped layers whose attention adds a relative position bias; no token types; a dense + out_proj head.

transformers' MPNet computes its relative position bias once per forward, from the positions
0..L-1 of the sequence it is given, and its attention is eager only: it does not go through
transformers' AttentionInterface, so dynbert's kernel never sees it. The adapter therefore runs
``MPNetAttention`` itself, through the kernel (which returns the token scores), and computes the
bias in every layer from the *original* positions of the tokens still present: after a gather a
pair of tokens keeps the distance it had in the input, as in soft mode, where nothing moves.
"""

from __future__ import annotations

from transformers import MPNetForSequenceClassification
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

from . import EncoderAdapter, register

PADDING_IDX = 1
"""MPNetEmbeddings' padding index, fixed whatever config.pad_token_id says: positions start after it."""


@register
class MPNetAdapter(EncoderAdapter):
    model_types = ("mpnet",)
    model_class = MPNetForSequenceClassification
    has_token_types = False
    # Its own forward adds the mask it builds to float logits: that needs eager's float masks (the
    # "dynbert" and "sdpa" names build boolean ones), and eager is the only attention it has.
    gated_attention = plain_attention = "eager"

    @property
    def layers(self):
        return self.model.mpnet.encoder.layer

    def embed(self, input_ids, token_type_ids):
        """Absolute positions are counted over the ids other than 1 from 2 (MPNetEmbeddings, as
        RoBERTa's), so right padding leaves every real token's position as it is alone."""
        return self.model.mpnet.embeddings(input_ids=input_ids)

    def attention(self, layer, hidden, bias, positions, **kernel_kwargs):
        """``MPNetAttention`` (q, k, v, o; dropout, residual, LayerNorm) on dynbert's kernel, the
        relative position bias of ``positions`` added to the engine's ``bias``."""
        attention, attn = layer.attention, layer.attention.attn
        heads_shape = (*hidden.shape[:-1], -1, attn.attention_head_size)
        query, key, value = (project(hidden).view(heads_shape).transpose(1, 2) for project in (attn.q, attn.k, attn.v))
        # Registered by dynbert.core, which every caller of an adapter has imported.
        kernel = ALL_ATTENTION_FUNCTIONS["dynbert"]
        output, score = kernel(attn, query, key, value, bias + self.position_bias(positions),
                               scaling=attn.attention_head_size**-0.5,
                               dropout=attn.dropout.p if attn.training else 0.0, **kernel_kwargs)
        output = attn.o(output.reshape(*hidden.shape[:-1], -1))
        return attention.LayerNorm(attention.dropout(output) + hidden), score

    def feed_forward(self, layer, attended):
        """MPNetLayer's intermediate and output (dense, GELU, dense; dropout, residual, LayerNorm)."""
        return layer.output(layer.intermediate(attended), attended)

    def position_bias(self, positions):
        """(batch, heads, queries, keys): ``MPNetEncoder.compute_position_bias`` for each example's
        own positions (its ``position_ids`` branch cannot take a batch of them)."""
        relative = positions[:, None, :] - positions[:, :, None]  # key minus query, as memory - context
        # Default bucketing (32 buckets, distances up to 128), as MPNetEncoder.forward calls it
        # whatever config.relative_attention_num_buckets says.
        buckets = MPNetEncoder.relative_position_bucket(relative)
        return self.model.mpnet.encoder.relative_attention_bias(buckets).permute(0, 3, 1, 2)

    def head(self, hidden):
        """MPNetClassificationHead on the first token (<s>): dense + tanh (D² MACs), out_proj (D·C)."""
        return self.model.classifier(hidden)

    @property
    def max_positions(self):
        """Position ids start after the padding index: mpnet-base's 514 embeddings take 512 tokens."""
        return self.config.max_position_embeddings - PADDING_IDX - 1

    @classmethod
    def config_for(cls, *, max_positions, **sizes_and_config):
        return super().config_for(max_positions=max_positions + PADDING_IDX + 1, **sizes_and_config)
