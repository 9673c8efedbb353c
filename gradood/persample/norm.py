"""Normalisation layers: eval-mode BatchNorm1d/2d/3d, LayerNorm, GroupNorm, RMSNorm.

Per sample, dγ = Σ g ⊙ x̂ and dβ = Σ g over that sample's positions only,
with x̂ the normalised input. Train-mode BatchNorm (and BatchNorm without
running statistics) normalises with batch statistics, which mixes samples:
the engine refuses it before any rule runs.
"""

from __future__ import annotations

import torch
from torch import nn

from gradood.persample._rules import RuleResult, register_rule


def _per_channel_norms(module: nn.Module, normalised: torch.Tensor, grad_output: torch.Tensor) -> RuleResult:
    """γ and β per channel (dim 1): sums over the positions (dims 2...) of each sample."""
    batch, channels = grad_output.shape[0], grad_output.shape[1]
    squared = {}
    if module.weight is not None:
        squared["weight"] = (grad_output * normalised).reshape(batch, channels, -1).sum(2).square().sum(1)
    if getattr(module, "bias", None) is not None:
        squared["bias"] = grad_output.reshape(batch, channels, -1).sum(2).square().sum(1)
    return RuleResult(squared, "direct")


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm_rule(module: nn.modules.batchnorm._BatchNorm, inputs: torch.Tensor, grad_output: torch.Tensor) -> RuleResult:
    """Eval mode: x̂ = (x - running_mean) / sqrt(running_var + eps), per channel (dim 1)."""
    shape = (1, -1) + (1,) * (inputs.dim() - 2)
    mean = module.running_mean.to(inputs.dtype).reshape(shape)
    variance = module.running_var.to(inputs.dtype).reshape(shape)
    normalised = (inputs - mean) * torch.rsqrt(variance + module.eps)
    return _per_channel_norms(module, normalised, grad_output)


def _sum_leading(tensor: torch.Tensor, trailing: int) -> torch.Tensor:
    """Sums the dims between the batch dim and the last `trailing` dims."""
    dims = tuple(range(1, tensor.dim() - trailing))
    return tensor.sum(dims) if dims else tensor


def _last_dims_norms(module: nn.Module, normalised: torch.Tensor, grad_output: torch.Tensor, trailing: int) -> RuleResult:
    squared = {}
    batch = grad_output.shape[0]
    if module.weight is not None:
        squared["weight"] = _sum_leading(grad_output * normalised, trailing).reshape(batch, -1).square().sum(1)
    if getattr(module, "bias", None) is not None:
        squared["bias"] = _sum_leading(grad_output, trailing).reshape(batch, -1).square().sum(1)
    return RuleResult(squared, "direct")


@register_rule(nn.LayerNorm)
def layer_norm_rule(module: nn.LayerNorm, inputs: torch.Tensor, grad_output: torch.Tensor) -> RuleResult:
    """x̂ normalised over the last len(normalized_shape) dims (biased variance)."""
    trailing = len(module.normalized_shape)
    dims = tuple(range(inputs.dim() - trailing, inputs.dim()))
    mean = inputs.mean(dims, keepdim=True)
    variance = inputs.var(dims, unbiased=False, keepdim=True)
    normalised = (inputs - mean) * torch.rsqrt(variance + module.eps)
    return _last_dims_norms(module, normalised, grad_output, trailing)


if hasattr(nn, "RMSNorm"):

    @register_rule(nn.RMSNorm)
    def rms_norm_rule(module: nn.RMSNorm, inputs: torch.Tensor, grad_output: torch.Tensor) -> RuleResult:
        """x̂ = x / sqrt(mean(x²) + eps) over the last len(normalized_shape) dims."""
        trailing = len(module.normalized_shape)
        dims = tuple(range(inputs.dim() - trailing, inputs.dim()))
        eps = module.eps if module.eps is not None else torch.finfo(inputs.dtype).eps
        normalised = inputs * torch.rsqrt(inputs.square().mean(dims, keepdim=True) + eps)
        return _last_dims_norms(module, normalised, grad_output, trailing)


@register_rule(nn.GroupNorm)
def group_norm_rule(module: nn.GroupNorm, inputs: torch.Tensor, grad_output: torch.Tensor) -> RuleResult:
    """x̂ normalised per sample and channel group; γ, β per channel (dim 1)."""
    batch = inputs.shape[0]
    grouped = inputs.reshape(batch, module.num_groups, -1)
    mean = grouped.mean(2, keepdim=True)
    variance = grouped.var(2, unbiased=False, keepdim=True)
    normalised = ((grouped - mean) * torch.rsqrt(variance + module.eps)).reshape(inputs.shape)
    return _per_channel_norms(module, normalised, grad_output)
