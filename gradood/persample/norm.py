"""Normalisation layers: eval-mode BatchNorm1d/2d/3d, LayerNorm, GroupNorm, RMSNorm.

Per sample, dγ = Σ g ⊙ x̂ and dβ = Σ g over that sample's positions only,
with x̂ the normalised input. Train-mode BatchNorm (and BatchNorm without
running statistics) normalises with batch statistics, which mixes samples:
the engine refuses it before any rule runs.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
from torch import nn

from gradood.persample._grads import DenseLayerGradients, register_grad_rule
from gradood.persample._rules import RuleResult, register_rule


def _affine_grads(
    module: nn.Module, grad_output: torch.Tensor, inputs: torch.Tensor, shift, scale
) -> Dict[str, torch.Tensor]:
    """dγ, dβ per sample [B, C] from [B, C, T] views (gradood::norm_affine_grads:
    one pass, g ⊙ x̂ never formed); only the parameters the module has."""
    weight, bias = torch.ops.gradood.norm_affine_grads(grad_output, inputs, shift, scale)
    grads = {}
    if module.weight is not None:
        grads["weight"] = weight.to(grad_output.dtype)
    if getattr(module, "bias", None) is not None:
        grads["bias"] = bias.to(grad_output.dtype)
    return grads


def _batch_norm_grads(module, inputs, grad_output):
    """Eval mode: x̂ = (x - running_mean) / sqrt(running_var + eps), per channel (dim 1)."""
    batch, channels = inputs.shape[:2]
    x, g = inputs.reshape(batch, channels, -1), grad_output.reshape(batch, channels, -1)
    mean = module.running_mean.to(inputs.dtype)
    inv_std = torch.rsqrt(module.running_var.to(inputs.dtype) + module.eps)
    return _affine_grads(module, g, x, mean[None, :, None].expand_as(x), inv_std[None, :, None].expand_as(x))


def group_norm_statistics(x: torch.Tensor, groups: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The mean and 1/sqrt(var + eps) per channel, [B, C, T] each (expanded views), of
    x [B, C, T] normalised per sample and group of C / groups channels: the forward's
    own statistics (aten::native_group_norm, one pass; torch.var_mean took 17x longer)."""
    batch, channels, positions = x.shape
    # The kernel needs a contiguous input (a channels_last or sliced one is a strided view here).
    _, mean, inv_std = torch.ops.aten.native_group_norm(
        x.contiguous(), None, None, batch, channels, positions, groups, eps
    )
    per_group = channels // groups
    mean = mean.to(x.dtype).repeat_interleave(per_group, 1)[:, :, None].expand_as(x)
    inv_std = inv_std.to(x.dtype).repeat_interleave(per_group, 1)[:, :, None].expand_as(x)
    return mean, inv_std


def layer_norm_statistics(inputs: torch.Tensor, features: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The mean and 1/sqrt(var + eps) over the last dims (`features` entries) of inputs
    [B, ..., features...], as [B, 1, T] with T every other position (aten::native_layer_norm,
    the forward's own statistics)."""
    rows = inputs.reshape(-1, features)
    _, mean, inv_std = torch.ops.aten.native_layer_norm(rows, [features], None, None, eps)
    batch = inputs.shape[0]
    return mean.to(inputs.dtype).reshape(batch, 1, -1), inv_std.to(inputs.dtype).reshape(batch, 1, -1)


def _group_norm_grads(module, inputs, grad_output):
    """x̂ normalised per sample and channel group (biased variance)."""
    batch, channels = inputs.shape[:2]
    x, g = inputs.reshape(batch, channels, -1), grad_output.reshape(batch, channels, -1)
    mean, inv_std = group_norm_statistics(x, module.num_groups, module.eps)
    return _affine_grads(module, g, x, mean, inv_std)


def _last_dims_grads(module, inputs, grad_output):
    """LayerNorm / RMSNorm over the last len(normalized_shape) dims: the
    parameter's entries are those dims (C), the positions every dim between
    the batch dim and them (T)."""
    batch, features = inputs.shape[0], math.prod(module.normalized_shape)
    x = inputs.reshape(batch, -1, features).transpose(1, 2)  # [B, C, T]
    g = grad_output.reshape(batch, -1, features).transpose(1, 2)
    if isinstance(module, nn.LayerNorm):
        mean, inv_std = layer_norm_statistics(inputs, features, module.eps)
        return _affine_grads(module, g, x, mean.expand_as(x), inv_std.expand_as(x))
    eps = module.eps if module.eps is not None else torch.finfo(inputs.dtype).eps
    return _affine_grads(module, g, x, None, torch.rsqrt(x.square().mean(1, keepdim=True) + eps).expand_as(x))


def _grads(module: nn.Module, inputs: torch.Tensor, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-sample dγ, dβ [B, numel] of any of the supported normalisation layers."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _batch_norm_grads(module, inputs, grad_output)
    if isinstance(module, nn.GroupNorm):
        return _group_norm_grads(module, inputs, grad_output)
    return _last_dims_grads(module, inputs, grad_output)


_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


@register_rule(*_NORM_TYPES)
def norm_rule(module: nn.Module, inputs: torch.Tensor, grad_output: torch.Tensor) -> RuleResult:
    """‖dγ‖², ‖dβ‖² per sample."""
    return RuleResult(
        {name: grads.square().sum(1) for name, grads in _grads(module, inputs, grad_output).items()}, "direct"
    )


@register_grad_rule(*_NORM_TYPES)
def norm_grads(module: nn.Module, inputs: torch.Tensor, grad_output: torch.Tensor) -> DenseLayerGradients:
    """dγ, dβ per sample, [B, numel] (small: computed for the whole batch once)."""
    grads = _grads(module, inputs, grad_output)
    numels = {name: value.shape[1] for name, value in grads.items()}
    return DenseLayerGradients(inputs.shape[0], numels, lambda start, end: {n: g[start:end] for n, g in grads.items()})
