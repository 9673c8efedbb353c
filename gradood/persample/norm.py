"""Normalisation layers: eval-mode BatchNorm1d/2d/3d, LayerNorm, GroupNorm, RMSNorm.

Per sample, dγ = Σ g ⊙ x̂ and dβ = Σ g over that sample's positions only,
with x̂ the normalised input. Train-mode BatchNorm (and BatchNorm without
running statistics) normalises with batch statistics, which mixes samples:
the engine refuses it before any rule runs.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from gradood.persample._grads import DenseLayerGradients, register_grad_rule
from gradood.persample._rules import RuleResult, register_rule


def _per_channel_grads(module: nn.Module, normalised: torch.Tensor, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
    """γ and β per channel (dim 1): sums over the positions (dims 2...) of each sample, [B, C]."""
    batch, channels = grad_output.shape[0], grad_output.shape[1]
    grads = {}
    if module.weight is not None:
        grads["weight"] = (grad_output * normalised).reshape(batch, channels, -1).sum(2)
    if getattr(module, "bias", None) is not None:
        grads["bias"] = grad_output.reshape(batch, channels, -1).sum(2)
    return grads


def _sum_leading(tensor: torch.Tensor, trailing: int) -> torch.Tensor:
    """Sums the dims between the batch dim and the last `trailing` dims."""
    dims = tuple(range(1, tensor.dim() - trailing))
    return tensor.sum(dims) if dims else tensor


def _last_dims_grads(module: nn.Module, normalised: torch.Tensor, grad_output: torch.Tensor, trailing: int) -> Dict[str, torch.Tensor]:
    """γ and β over the last `trailing` dims, summed over the other positions: [B, numel]."""
    grads = {}
    batch = grad_output.shape[0]
    if module.weight is not None:
        grads["weight"] = _sum_leading(grad_output * normalised, trailing).reshape(batch, -1)
    if getattr(module, "bias", None) is not None:
        grads["bias"] = _sum_leading(grad_output, trailing).reshape(batch, -1)
    return grads


def _batch_norm_normalised(module, inputs):
    """Eval mode: x̂ = (x - running_mean) / sqrt(running_var + eps), per channel (dim 1)."""
    shape = (1, -1) + (1,) * (inputs.dim() - 2)
    mean = module.running_mean.to(inputs.dtype).reshape(shape)
    variance = module.running_var.to(inputs.dtype).reshape(shape)
    return (inputs - mean) * torch.rsqrt(variance + module.eps)


def _layer_norm_normalised(module, inputs):
    """x̂ normalised over the last len(normalized_shape) dims (biased variance)."""
    trailing = len(module.normalized_shape)
    dims = tuple(range(inputs.dim() - trailing, inputs.dim()))
    mean = inputs.mean(dims, keepdim=True)
    variance = inputs.var(dims, unbiased=False, keepdim=True)
    return (inputs - mean) * torch.rsqrt(variance + module.eps)


def _rms_norm_normalised(module, inputs):
    """x̂ = x / sqrt(mean(x²) + eps) over the last len(normalized_shape) dims."""
    trailing = len(module.normalized_shape)
    dims = tuple(range(inputs.dim() - trailing, inputs.dim()))
    eps = module.eps if module.eps is not None else torch.finfo(inputs.dtype).eps
    return inputs * torch.rsqrt(inputs.square().mean(dims, keepdim=True) + eps)


def _group_norm_normalised(module, inputs):
    """x̂ normalised per sample and channel group."""
    grouped = inputs.reshape(inputs.shape[0], module.num_groups, -1)
    mean = grouped.mean(2, keepdim=True)
    variance = grouped.var(2, unbiased=False, keepdim=True)
    return ((grouped - mean) * torch.rsqrt(variance + module.eps)).reshape(inputs.shape)


def _grads(module: nn.Module, inputs: torch.Tensor, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-sample dγ, dβ [B, numel] of any of the supported normalisation layers."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _per_channel_grads(module, _batch_norm_normalised(module, inputs), grad_output)
    if isinstance(module, nn.GroupNorm):
        return _per_channel_grads(module, _group_norm_normalised(module, inputs), grad_output)
    normalise = _layer_norm_normalised if isinstance(module, nn.LayerNorm) else _rms_norm_normalised
    return _last_dims_grads(module, normalise(module, inputs), grad_output, len(module.normalized_shape))


_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


@register_rule(*_NORM_TYPES)
def norm_rule(module: nn.Module, inputs: torch.Tensor, grad_output: torch.Tensor) -> RuleResult:
    """‖dγ‖², ‖dβ‖² per sample."""
    return RuleResult({name: grads.square().sum(1) for name, grads in _grads(module, inputs, grad_output).items()}, "direct")


@register_grad_rule(*_NORM_TYPES)
def norm_grads(module: nn.Module, inputs: torch.Tensor, grad_output: torch.Tensor) -> DenseLayerGradients:
    """dγ, dβ per sample, [B, numel] (small: computed for the whole batch once)."""
    grads = _grads(module, inputs, grad_output)
    numels = {name: value.shape[1] for name, value in grads.items()}
    return DenseLayerGradients(inputs.shape[0], numels, lambda start, end: {n: g[start:end] for n, g in grads.items()})
