"""Encoder adapters: what the pruning engine needs from one model family, and nothing more.

An adapter wraps a transformers ``*ForSequenceClassification`` model and exposes its embeddings,
its layers split into the attention part and the feed-forward part, and its classification
head, reusing transformers' own modules (no modeling file is copied). A new family is one small
module here that subclasses ``EncoderAdapter`` and registers its ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EncoderDims:
    """What FLOPs counting needs to know of an encoder (METHOD.md §4)."""

    hidden: int
    intermediate: int
    num_layers: int
    head_macs: int
    """Multiply-accumulates of the classification head per example (it reads the first token)."""
    embed_macs_per_token: int = 0
    """Matrix products in the embeddings per token (ELECTRA-small's projection); lookups are free."""


class EncoderAdapter:
    """One model family seen by the engine. Subclasses set ``model_types`` and the methods below."""

    model_types: tuple[str, ...] = ()
    model_class: type = None
    """The transformers ``*ForSequenceClassification`` class of the family."""
    new_head: tuple[str, ...] = ("classifier.",)
    """Weight-name prefixes a pretrained checkpoint may lack: the task's new head."""
    has_token_types = True
    no_decay_names: tuple[str, ...] = ("bias", "LayerNorm.weight")
    """Parameter-name endings that get no weight decay (biases and norms)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # The encoder, piece by piece --------------------------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def attention(self, layer: nn.Module, hidden: torch.Tensor, bias: torch.Tensor, **kernel_kwargs):
        """The layer's attention sub-layer (projections, residual, norm): (output, token score)."""
        return layer.attention(hidden, bias, **kernel_kwargs)

    def feed_forward(self, layer: nn.Module, attended: torch.Tensor) -> torch.Tensor:
        return layer.feed_forward_chunk(attended)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last layer's hidden states (the first token, CLS, is read)."""
        raise NotImplementedError

    # Facts ----------------------------------------------------------------------------------------

    @property
    def dims(self) -> EncoderDims:
        config = self.config
        hidden, labels = config.hidden_size, config.num_labels
        return EncoderDims(hidden=hidden, intermediate=config.intermediate_size,
                           num_layers=config.num_hidden_layers, head_macs=hidden * hidden + hidden * labels)

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    def no_decay(self, name: str) -> bool:
        return name.endswith(self.no_decay_names)


_ADAPTERS: dict[str, type[EncoderAdapter]] = {}


def register(adapter: type[EncoderAdapter]) -> type[EncoderAdapter]:
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter
    return adapter


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_ADAPTERS))


def adapter_class(model_type: str) -> type[EncoderAdapter] | None:
    return _ADAPTERS.get(model_type)


def adapter_for(model: nn.Module) -> EncoderAdapter:
    adapter = adapter_class(model.config.model_type)
    if adapter is None:
        raise ValueError(f"no encoder adapter for model_type {model.config.model_type!r}; "
                         f"supported: {', '.join(supported_model_types())}")
    return adapter(model)


from . import bert  # noqa: E402,F401 - each family registers itself
