"""Encoder adapters: what the pruning engine needs from one model family, and nothing more.

An adapter wraps a transformers ``*ForSequenceClassification`` model and exposes its embeddings,
its layers split into the attention part and the feed-forward part, and its classification
head, reusing transformers' own modules (no modeling file is copied). A new family is one small
module here that subclasses ``EncoderAdapter`` and registers its ``model_type`` (docs/encoders.md).
``random_model`` builds a randomly initialised classifier of any family from sizes named alike for
all of them (tests, benchmarks).
"""

from __future__ import annotations

import importlib
import pkgutil
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

    def layer_macs(self, tokens_in: torch.Tensor, tokens_out: torch.Tensor) -> torch.Tensor:
        """Multiply-accumulates of one encoder layer, elementwise over tensors of token counts:
        ``tokens_in`` enter it, ``tokens_out`` are left after its decision (made after attention).

        A BERT-shaped layer: Q, K, V, O (4·D²·L_in), QKᵀ and AV (2·D·L_in²), the feed-forward
        network on the kept tokens (2·D·I·L_out). A family whose layer costs otherwise (a gated MLP,
        another attention) returns a subclass of ``EncoderDims`` that overrides this from its
        adapter's ``dims``; ``core.flops_per_example`` counts every layer with it.
        """
        hidden, intermediate = self.hidden, self.intermediate
        return 4 * hidden**2 * tokens_in + 2 * hidden * tokens_in**2 + 2 * hidden * intermediate * tokens_out


class EncoderAdapter:
    """One model family seen by the engine. Subclasses set ``model_types`` and the methods below."""

    model_types: tuple[str, ...] = ()
    model_class: type = None
    """The transformers ``*ForSequenceClassification`` class of the family."""
    new_head: tuple[str, ...] = ("classifier.",)
    """Weight-name prefixes a pretrained checkpoint may lack: the task's new head."""
    has_token_types = True
    """Whether the embeddings read token type ids (segment A/B); families without them get None."""
    gated_attention = "dynbert"
    """The model's ``_attn_implementation`` inside ``GatedModel``: dynbert's kernel, which the family's
    attention modules reach through transformers' AttentionInterface. A family whose attention does
    not go through it (MPNet) calls the kernel in ``attention`` itself and names its own here, so its
    own forward still builds the masks its attention expects."""
    plain_attention = "sdpa"
    """The model's ``_attn_implementation`` for its own forward, un-pruned (benchmark baselines)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        # Found by module type, not by name: families name their norms differently (BERT's
        # LayerNorm, DistilBERT's sa_layer_norm and output_layer_norm).
        self._norm_parameters = {f"{module_name}.{name}" if module_name else name
                                 for module_name, module in model.named_modules()
                                 if isinstance(module, nn.LayerNorm)
                                 for name, _ in module.named_parameters(recurse=False)}

    # A random model of the family -------------------------------------------------------------

    @classmethod
    def config_for(cls, *, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                   vocab_size: int, max_positions: int, **config):
        """The family's config for these sizes (BERT's names here; a family naming them otherwise
        overrides this). ``max_positions``: the longest input the model takes. Other keys (e.g.
        ``num_labels``, ``initializer_range``, ``attn_implementation``) pass through."""
        return cls.model_class.config_class(
            hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            intermediate_size=intermediate_size, vocab_size=vocab_size, max_position_embeddings=max_positions,
            **config)

    @classmethod
    def random_model(cls, **sizes_and_config) -> nn.Module:
        """A randomly initialised ``model_class`` of the family (``config_for``'s arguments)."""
        return cls.model_class(cls.config_for(**sizes_and_config))

    # The encoder, piece by piece --------------------------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def attention(self, layer: nn.Module, hidden: torch.Tensor, bias: torch.Tensor, positions: torch.Tensor,
                  **kernel_kwargs):
        """The layer's attention sub-layer (projections, residual, norm): (output, token score).

        ``bias``: (batch, 1, 1, keys), the engine's additive bias (padding and dropped tokens blocked,
        log keep weights in soft mode); the adapter may add whatever its attention needs to it, per
        head and per query (MPNet's relative position bias), since the kernel broadcasts it.
        ``positions``: (batch, length) each present token's position in the original input (kept
        tokens are gathered in order, so these have gaps). BERT-shaped families added absolute
        positions in ``embed`` and need nothing more here.
        """
        return layer.attention(hidden, bias, **kernel_kwargs)

    def feed_forward(self, layer: nn.Module, attended: torch.Tensor) -> torch.Tensor:
        return layer.feed_forward_chunk(attended)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last layer's hidden states (the first token, CLS, is read)."""
        raise NotImplementedError

    # Facts ----------------------------------------------------------------------------------------

    @property
    def dims(self) -> EncoderDims:
        """Every shipped family's head is a D x D dense layer on the first token, then D x C to the
        labels (BERT's pooler, RoBERTa's and ELECTRA's dense, DistilBERT's pre_classifier)."""
        config = self.config
        hidden, labels = config.hidden_size, config.num_labels
        return EncoderDims(hidden=hidden, intermediate=config.intermediate_size,
                           num_layers=config.num_hidden_layers, head_macs=hidden * hidden + hidden * labels)

    @property
    def max_positions(self) -> int:
        """The longest input the position embeddings take."""
        return self.config.max_position_embeddings

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    def no_decay(self, name: str) -> bool:
        """Whether parameter ``name`` of the model gets no weight decay: biases and norm weights."""
        return name.endswith("bias") or name in self._norm_parameters


_ADAPTERS: dict[str, type[EncoderAdapter]] = {}


def register(adapter: type[EncoderAdapter]) -> type[EncoderAdapter]:
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter
    return adapter


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_ADAPTERS))


def adapter_class(model_type: str) -> type[EncoderAdapter] | None:
    return _ADAPTERS.get(model_type)


def registered(model_type: str) -> type[EncoderAdapter]:
    """The adapter class for ``model_type``, or a ValueError naming the supported ones."""
    adapter = adapter_class(model_type)
    if adapter is None:
        raise ValueError(f"no encoder adapter for model_type {model_type!r}; "
                         f"supported: {', '.join(supported_model_types())}")
    return adapter


def adapter_for(model: nn.Module) -> EncoderAdapter:
    return registered(model.config.model_type)(model)


def random_model(model_type: str, **sizes_and_config) -> nn.Module:
    """A randomly initialised classifier of the family registered for ``model_type``, e.g.
    ``random_model("roberta", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
    vocab_size=50265, max_positions=512, num_labels=2)`` (``EncoderAdapter.config_for``)."""
    return registered(model_type).random_model(**sizes_and_config)


# Every module of this package is one family that registers itself when imported: a new family is
# one new file, and nothing else in dynbert changes.
for _family in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_family.name}")
