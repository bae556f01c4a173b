"""ELECTRA (the discriminator): BERT's layers, an optional embedding projection, a dense + out_proj head."""

from __future__ import annotations

from dataclasses import replace

from transformers import ElectraForSequenceClassification

from . import EncoderAdapter, register


@register
class ElectraAdapter(EncoderAdapter):
    model_types = ("electra",)
    model_class = ElectraForSequenceClassification

    @property
    def layers(self):
        return self.model.electra.encoder.layer

    def embed(self, input_ids, token_type_ids):
        electra = self.model.electra
        hidden = electra.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        # ELECTRA-small embeds in 128 dimensions and projects to its 256 hidden ones.
        if hasattr(electra, "embeddings_project"):
            hidden = electra.embeddings_project(hidden)
        return hidden

    def head(self, hidden):
        """ElectraClassificationHead on the first token: dense + GELU (D² MACs), out_proj (D·C)."""
        return self.model.classifier(hidden)

    @property
    def dims(self):
        """BERT's, plus the embedding projection (E·D MACs per token) where embedding_size != hidden_size."""
        config = self.config
        projection = config.embedding_size * config.hidden_size if config.embedding_size != config.hidden_size else 0
        return replace(super().dims, embed_macs_per_token=projection)

    @classmethod
    def config_for(cls, *, hidden_size, embedding_size=None, **sizes_and_config):
        """``embedding_size`` defaults to ``hidden_size`` (ELECTRA-base and -large; -small uses 128)."""
        return super().config_for(hidden_size=hidden_size, embedding_size=embedding_size or hidden_size,
                                  **sizes_and_config)
