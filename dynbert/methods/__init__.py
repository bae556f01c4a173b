"""Token-pruning methods, each one small module behind ``core.TokenPruner``.

``build_method(cfg.method, ...)`` turns the ``method`` config group into a method; each module
documents its formula and where it differs from its paper (``docs/methods.md``).
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..core import TokenPruner
from .gates import Gates
from .ltp import LearnedTokenPruning
from .power_bert import PowerBert
from .random_tokens import RandomTokens
from .topk import TopK


class NoPruning(TokenPruner):
    """The un-pruned baseline (method=none): plain fine-tuning, nothing dropped."""

    name = "none"

    def token_weights(self, values, row, tokens, hard):  # pragma: no cover - it has no layers
        raise AssertionError("the baseline prunes no layer")


def build_method(cfg: DictConfig, num_layers: int, max_length: int, num_heads: int) -> TokenPruner:
    """The method the config asks for, pruning ``cfg.layers`` (null: every layer) of the model.

    Keys added since a run folder was written (``target``, ``target_lr``, PoWER-BERT's ``ranks``)
    take the value that run trained with: a saved config.yaml without them still loads.

    ``num_heads``: the encoder's attention heads (a method may average its score over them).
    """
    layers = list(range(num_layers)) if cfg.get("layers") is None else sorted(set(cfg.layers))
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"method.layers={list(cfg.layers)} is out of range: the model has layers 0..{num_layers - 1}")
    if cfg.name == "none":
        return NoPruning([], max_length)
    if cfg.name == "gates":
        return Gates(layers, max_length, num_layers, score=cfg.score, parametrization=cfg.parametrization,
                     monotone=cfg.monotone, layer_weighting=cfg.layer_weighting, sparsity=cfg.sparsity,
                     bimodal_weight=cfg.bimodal_weight, bimodal_schedule=cfg.bimodal_schedule, lr=cfg.lr,
                     start=cfg.start, harden_at=cfg.harden_at, ranks=cfg.ranks, target=cfg.get("target"),
                     target_lr=cfg.get("target_lr"))
    if cfg.name == "power_bert":
        return PowerBert(layers, max_length, lr=cfg.lr, start=cfg.start, retrain_at=cfg.retrain_at,
                         ranks=cfg.get("ranks", "absolute"), target=cfg.get("target"),
                         target_lr=cfg.get("target_lr"))
    if cfg.name == "ltp":
        return LearnedTokenPruning(layers, max_length, num_layers, num_heads, threshold=cfg.threshold,
                                   temperature=cfg.temperature, lr=cfg.lr, start=cfg.start, freeze_at=cfg.freeze_at,
                                   target=cfg.get("target"), target_lr=cfg.get("target_lr"))
    if cfg.name == "topk":
        return TopK(layers, max_length, num_layers, keep=cfg.keep, target=cfg.get("target"))
    if cfg.name == "random":
        return RandomTokens(layers, max_length, num_layers, keep=cfg.keep, seed=cfg.seed, target=cfg.get("target"))
    raise ValueError(f"unknown method {cfg.name!r}")
