"""nn.Conv1d and nn.Conv2d: any stride, padding (numbers, 'same', 'valid', any
padding_mode), dilation and groups (depthwise included)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradood.persample._rules import RuleResult, register_rule, sum_of_outer_products_sq_norm


def _padded(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    # The exact padding the module's forward applies ('same' may be asymmetric).
    padding = module._reversed_padding_repeated_twice
    if not any(padding):
        return inputs
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(inputs, padding, mode=mode)


@register_rule(nn.Conv1d, nn.Conv2d)
def conv_rule(module: nn.Module, inputs: torch.Tensor, grad_output: torch.Tensor) -> RuleResult:
    """Per group, the patches a_t (im2col of the padded input) and output
    gradients g_t give ‖Σ_t g_t a_tᵀ‖² (ghost or materialise, all groups in one
    batched product); bias: ‖Σ_t g_t‖²."""
    batch, groups = inputs.shape[0], module.groups
    padded = _padded(module, inputs)
    if isinstance(module, nn.Conv1d):  # as a 2-D convolution of height 1
        padded, grad_output = padded.unsqueeze(2), grad_output.unsqueeze(2)
        kernel, dilation, stride = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    patches = F.unfold(padded, kernel, dilation=dilation, stride=stride)  # [B, C·K, T]
    positions = patches.shape[-1]
    # Channel-major rows: group g owns a contiguous block of rows and of output channels.
    activations = patches.reshape(batch, groups, -1, positions).transpose(2, 3)
    grads = grad_output.reshape(batch, groups, -1, positions).transpose(2, 3)
    result = sum_of_outer_products_sq_norm(
        activations.reshape(batch * groups, positions, -1), grads.reshape(batch * groups, positions, -1)
    )
    result.squared_norms["weight"] = result.squared_norms["weight"].reshape(batch, groups).sum(1)
    if module.bias is not None:
        result.squared_norms["bias"] = grad_output.reshape(batch, grad_output.shape[1], -1).sum(2).square().sum(1)
    return result
