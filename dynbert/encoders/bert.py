"""BERT (and MiniLM, which is a BERT): embeddings, layers, pooler + classifier."""

from __future__ import annotations

from transformers import BertForSequenceClassification

from . import EncoderAdapter, register


@register
class BertAdapter(EncoderAdapter):
    model_types = ("bert",)
    model_class = BertForSequenceClassification
    # The pooler belongs to the head: checkpoints saved from BertForMaskedLM have none.
    new_head = ("classifier.", "bert.pooler.")

    @property
    def layers(self):
        return self.model.bert.encoder.layer

    def embed(self, input_ids, token_type_ids):
        return self.model.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def head(self, hidden):
        """The pooler (dense + tanh on CLS, D² MACs), dropout, the classifier (D·C)."""
        return self.model.classifier(self.model.dropout(self.model.bert.pooler(hidden)))
