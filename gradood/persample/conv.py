"""nn.Conv1d and nn.Conv2d: any stride, padding (numbers, 'same', 'valid', any
padding_mode), dilation and groups (depthwise included)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from gradood.persample._grads import DenseLayerGradients, outer_product_sums, register_grad_rule
from gradood.persample._rules import RuleResult, prefers_ghost, register_rule


def _padded(module: _ConvNd, inputs: torch.Tensor) -> torch.Tensor:
    # The exact padding the module's forward applies ('same' may be asymmetric).
    padding = module._reversed_padding_repeated_twice
    if not any(padding):
        return inputs
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(inputs, padding, mode=mode)


def _as_conv2d(module: _ConvNd, padded: torch.Tensor, grad_output: torch.Tensor):
    """A Conv1d as a 2-D convolution of height 1: (padded, grad_output, kernel, stride, dilation)."""
    if isinstance(module, nn.Conv1d):
        return (
            padded.unsqueeze(2),
            grad_output.unsqueeze(2),
            (1, *module.kernel_size),
            (1, *module.stride),
            (1, *module.dilation),
        )
    return padded, grad_output, module.kernel_size, module.stride, module.dilation


def _grouped_rows(module: _ConvNd, inputs: torch.Tensor, grad_output: torch.Tensor):
    """Per group, the patches a_t (im2col of the padded input) [B·groups, T, d/groups]
    and the output gradients g_t [B·groups, T, p/groups]."""
    batch, groups = inputs.shape[0], module.groups
    padded, grad_output, kernel, stride, dilation = _as_conv2d(module, _padded(module, inputs), grad_output)
    patches = F.unfold(padded, kernel, dilation=dilation, stride=stride)  # [B, C·K, T]
    positions = patches.shape[-1]
    # Channel-major rows: group g owns a contiguous block of rows and of output channels.
    activations = patches.reshape(batch, groups, -1, positions).transpose(2, 3)
    grads = grad_output.reshape(batch, groups, -1, positions).transpose(2, 3)
    return activations.reshape(batch * groups, positions, -1), grads.reshape(batch * groups, positions, -1)


def _bias_grads(grad_output: torch.Tensor) -> torch.Tensor:
    return grad_output.reshape(grad_output.shape[0], grad_output.shape[1], -1).sum(2)


@register_rule(nn.Conv1d, nn.Conv2d)
def conv_rule(module: _ConvNd, inputs: torch.Tensor, grad_output: torch.Tensor) -> RuleResult:
    """Per group, the patches a_t and output gradients g_t give ‖Σ_t g_t a_tᵀ‖²
    (ghost or materialise by the FLOP rule; gradood::conv2d_weight_sq_norm, an
    implicit GEMM on CUDA); bias: ‖Σ_t g_t‖²."""
    padded, grads, kernel, stride, dilation = _as_conv2d(module, _padded(module, inputs), grad_output)
    positions = grads.shape[2] * grads.shape[3]
    in_features = module.weight[0].numel()  # per group: C_in/groups · kernel taps
    ghost = prefers_ghost(positions, in_features, module.out_channels // module.groups)
    method = "ghost" if ghost else "materialise"
    squared = torch.ops.gradood.conv2d_weight_sq_norm(
        padded, grads, list(kernel), list(stride), list(dilation), module.groups, method
    )
    squared_norms = {"weight": squared.to(grad_output.dtype)}
    if module.bias is not None:
        squared_norms["bias"] = _bias_grads(grad_output).square().sum(1)
    return RuleResult(squared_norms, method)


@register_grad_rule(nn.Conv1d, nn.Conv2d)
def conv_grads(module: _ConvNd, inputs: torch.Tensor, grad_output: torch.Tensor) -> DenseLayerGradients:
    """weight: per group Σ_t g_t a_tᵀ, laid out as the weight [C_out, C_in/groups, *kernel];
    bias: Σ_t g_t. Patches are unfolded per chunk of samples."""
    batch = inputs.shape[0]
    numels = {"weight": module.weight.numel()}
    if module.bias is not None:
        numels["bias"] = module.bias.numel()
    positions = grad_output[0].numel() // grad_output.shape[1]
    patch_elements = positions * module.weight[0].numel() * module.groups

    def materialise(start: int, end: int):
        activations, grads = _grouped_rows(module, inputs[start:end], grad_output[start:end])
        chunk = {"weight": outer_product_sums(activations, grads).reshape(end - start, -1)}
        if module.bias is not None:
            chunk["bias"] = _bias_grads(grad_output[start:end])
        return chunk

    return DenseLayerGradients(batch, numels, materialise, per_sample_cost=patch_elements)
