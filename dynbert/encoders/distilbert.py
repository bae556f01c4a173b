"""DistilBERT: its own layer layout and config names, no token types, a pre_classifier + classifier head.

Its attention module returns the output projection *before* the residual and ``sa_layer_norm``;
its feed-forward network is ``ffn``, then the residual and ``output_layer_norm``. The adapter adds
those around transformers' own modules, as ``TransformerBlock.forward`` does.
"""

from __future__ import annotations

from transformers import DistilBertForSequenceClassification

from . import EncoderAdapter, EncoderDims, register


@register
class DistilBertAdapter(EncoderAdapter):
    model_types = ("distilbert",)
    model_class = DistilBertForSequenceClassification
    new_head = ("pre_classifier.", "classifier.")
    has_token_types = False

    @property
    def layers(self):
        return self.model.distilbert.transformer.layer

    def embed(self, input_ids, token_type_ids):
        return self.model.distilbert.embeddings(input_ids)

    def attention(self, layer, hidden, bias, positions, **kernel_kwargs):
        output, score = layer.attention(hidden, bias, **kernel_kwargs)
        return layer.sa_layer_norm(output + hidden), score

    def feed_forward(self, layer, attended):
        return layer.output_layer_norm(layer.ffn(attended) + attended)

    def head(self, hidden):
        """On the first token: pre_classifier + ReLU (D² MACs), dropout, classifier (D·C)."""
        model = self.model
        pooled = model.dropout(model.pre_classifier(hidden[:, 0]).relu())
        return model.classifier(pooled)

    @property
    def dims(self):
        config = self.config
        return EncoderDims(hidden=config.dim, intermediate=config.hidden_dim, num_layers=config.n_layers,
                           head_macs=config.dim * config.dim + config.dim * config.num_labels)

    @property
    def num_heads(self):
        return self.config.n_heads

    @classmethod
    def config_for(cls, *, hidden_size, num_layers, num_heads, intermediate_size, vocab_size, max_positions,
                   **config):
        return cls.model_class.config_class(dim=hidden_size, n_layers=num_layers, n_heads=num_heads,
                                            hidden_dim=intermediate_size, vocab_size=vocab_size,
                                            max_position_embeddings=max_positions, **config)
