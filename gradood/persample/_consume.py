"""What the engine does with one layer's recorded pieces: its per-sample squared
norms (persample_grad_norms) or its per-sample gradients (persample_gradients),
by the layer's rule, the torch.func fallback, a direct weight's linear piece, or,
for a layer called more than once, the combination of its calls (_reuse.py)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from gradood._sums import sum_tensors
from gradood.persample import _reuse
from gradood.persample._grads import DenseLayerGradients, LayerGradients, grad_rule_for, outer_product_sums
from gradood.persample._rules import CompositeRule, RuleResult, sum_of_outer_products_sq_norm
from gradood.persample.embedding import EmbeddingGradients, embedding_rule
from gradood.persample.fallback import torch_func_grads, torch_func_rule

Pieces = Dict[Optional[str], tuple]


def DIRECT_LINEAR(module, inputs, grad_output):  # noqa: N802  (a marker rule, see linear_rows)
    """The rule of a direct weight's only use, F.linear(x, W): the linear identity."""
    raise NotImplementedError


def DIRECT_EMBEDDING(module, inputs, grad_output):  # noqa: N802  (a marker rule)
    """The rule of a direct table's only use, F.embedding(ids, W): the embedding rule on an
    EmbeddingCall standing in for the module."""
    raise NotImplementedError


class EmbeddingCall:
    """What the embedding rule reads of a module, from an F.embedding call's arguments."""

    def __init__(self, weight: torch.Tensor, padding_idx, scale_grad_by_freq: bool):
        self.weight, self.padding_idx, self.scale_grad_by_freq = weight, padding_idx, scale_grad_by_freq
        self.num_embeddings = weight.shape[0]


def linear_rows(pieces: Pieces) -> Tuple[torch.Tensor, torch.Tensor]:
    """The single piece of a direct linear weight as [B, T, d] activations and [B, T, p] gradients."""
    ((inputs, grads),) = pieces.values()
    batch = inputs.shape[0]
    return inputs.reshape(batch, -1, inputs.shape[-1]), grads.reshape(batch, -1, grads.shape[-1])


def _one_call_norms(layer, pieces: Pieces) -> RuleResult:
    if layer.rule is DIRECT_EMBEDDING:
        ((ids, grads),) = pieces.values()
        return RuleResult(
            {layer.parameter_names[0]: embedding_rule(layer.module, ids, grads).squared_norms["weight"]}, "direct"
        )
    if layer.rule is DIRECT_LINEAR:
        result = sum_of_outer_products_sq_norm(*linear_rows(pieces))
        return RuleResult({layer.parameter_names[0]: result.squared_norms["weight"]}, result.method)
    if isinstance(layer.rule, CompositeRule):
        return layer.rule.norms(layer.module, pieces)
    if layer.rule is torch_func_rule:
        return torch_func_rule(layer.module, *pieces[None], layer.parameter_names)
    return layer.rule(layer.module, *pieces[None])


def _one_call_gradients(layer, pieces: Pieces) -> LayerGradients:
    if layer.rule is DIRECT_EMBEDDING:
        ((ids, grads),) = pieces.values()
        return EmbeddingGradients(layer.module, ids, grads, key=layer.parameter_names[0])
    if layer.rule is DIRECT_LINEAR:
        activations, grads = linear_rows(pieces)
        numel = activations.shape[2] * grads.shape[2]

        def materialise(start: int, end: int):
            return {
                layer.parameter_names[0]: outer_product_sums(activations[start:end], grads[start:end]).reshape(
                    end - start, -1
                )
            }

        return DenseLayerGradients(activations.shape[0], {layer.parameter_names[0]: numel}, materialise)
    if isinstance(layer.rule, CompositeRule):
        return layer.rule.grads(layer.module, pieces)
    if layer.rule is torch_func_rule:
        inputs, grad_output = pieces[None]
        return torch_func_grads(layer.module, inputs, grad_output, layer.parameter_names)
    return grad_rule_for(layer.module)(layer.module, *pieces[None])


def layer_norms(layer, pieces: Pieces) -> Tuple[torch.Tensor, str]:
    """The layer's per-sample squared norm [B], summed over its selected parameters, and its method."""
    if _reuse.is_reused(pieces):
        joined = (
            None
            if isinstance(layer.rule, CompositeRule) or layer.rule is torch_func_rule
            else _reuse.concatenated(layer.module, pieces)
        )
        if joined is None:
            gradients = _reuse.reused_gradients(pieces, lambda call: _one_call_gradients(layer, call))
            squared = _reuse.squared_norms(gradients.restrict(tuple(layer.parameter_names)))
            return sum_tensors(squared[name] for name in layer.parameter_names), "reused"
        pieces = joined
    result = _one_call_norms(layer, pieces)
    return sum_tensors(result.squared_norms[name] for name in layer.parameter_names), result.method


def layer_gradients(layer, pieces: Pieces) -> LayerGradients:
    if _reuse.is_reused(pieces):
        joined = (
            None
            if isinstance(layer.rule, CompositeRule) or layer.rule is torch_func_rule
            else _reuse.concatenated(layer.module, pieces)
        )
        if joined is None:
            return _reuse.reused_gradients(pieces, lambda call: _one_call_gradients(layer, call))
        pieces = joined
    return _one_call_gradients(layer, pieces)
