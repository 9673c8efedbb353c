"""nn.Linear on inputs of any rank: [B, d], [B, T, d], [B, *, d]: the norm rule
and the per-sample gradient rule."""

from __future__ import annotations

import torch
from torch import nn

from gradood.persample._grads import DenseLayerGradients, outer_product_sums, register_grad_rule
from gradood.persample._rules import RuleResult, register_rule, sum_of_outer_products_sq_norm


@register_rule(nn.Linear)
def linear_rule(module: nn.Linear, inputs: torch.Tensor, grad_output: torch.Tensor) -> RuleResult:
    """weight: ‖Σ_t g_t a_tᵀ‖² over the positions t of each sample (ghost or
    materialise, or ‖a‖²‖g‖² for 2-D input); bias: ‖Σ_t g_t‖²."""
    batch = inputs.shape[0]
    activations = inputs.reshape(batch, -1, inputs.shape[-1])
    grads = grad_output.reshape(batch, -1, grad_output.shape[-1])
    result = sum_of_outer_products_sq_norm(activations, grads)
    if module.bias is not None:
        result.squared_norms["bias"] = grads.sum(1).square().sum(1)
    return result


@register_grad_rule(nn.Linear)
def linear_grads(module: nn.Linear, inputs: torch.Tensor, grad_output: torch.Tensor) -> DenseLayerGradients:
    """weight: G_i = Σ_t g_t a_tᵀ [p, d]; bias: Σ_t g_t [p]."""
    batch = inputs.shape[0]
    activations = inputs.reshape(batch, -1, inputs.shape[-1])
    grads = grad_output.reshape(batch, -1, grad_output.shape[-1])
    numels = {"weight": module.weight.numel()}
    if module.bias is not None:
        numels["bias"] = module.bias.numel()

    def materialise(start: int, end: int):
        g = grads[start:end]
        chunk = {"weight": outer_product_sums(activations[start:end], g).reshape(end - start, -1)}
        if module.bias is not None:
            chunk["bias"] = g.sum(1)
        return chunk

    return DenseLayerGradients(batch, numels, materialise)
