"""RoBERTa: BERT's layers, with position ids counted from the input ids and a dense + out_proj head."""

from __future__ import annotations

from transformers import RobertaForSequenceClassification

from . import EncoderAdapter, register


@register
class RobertaAdapter(EncoderAdapter):
    model_types = ("roberta",)
    model_class = RobertaForSequenceClassification
    # roberta-base has one token type and its tokenizer returns none: pairs are told apart by </s></s>.
    has_token_types = False

    @property
    def layers(self):
        return self.model.roberta.encoder.layer

    def embed(self, input_ids, token_type_ids):
        """Positions are counted over the non-pad tokens from padding_idx + 1 (fairseq's way), so
        right padding leaves every real token's position as it is alone."""
        return self.model.roberta.embeddings(input_ids=input_ids)

    def head(self, hidden):
        """RobertaClassificationHead on the first token (<s>): dense + tanh (D² MACs), out_proj (D·C)."""
        return self.model.classifier(hidden)

    @property
    def max_positions(self):
        """Position ids start after padding_idx: roberta-base's 514 embeddings take 512 tokens."""
        return self.config.max_position_embeddings - self.config.pad_token_id - 1

    @classmethod
    def config_for(cls, *, max_positions, **sizes_and_config):
        pad_token_id = sizes_and_config.get("pad_token_id", cls.model_class.config_class.pad_token_id)
        return super().config_for(max_positions=max_positions + pad_token_id + 1, **sizes_and_config)
