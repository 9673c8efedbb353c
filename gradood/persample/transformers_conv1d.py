"""Hugging Face transformers' Conv1D (GPT-2, OpenAI GPT): a linear layer with the
weight stored transposed, y = x W + b with W [in, out]. Its per-sample gradient is
the linear one transposed, Σ_t a_t g_tᵀ, with the same norm. Matched by its
qualified name, so gradood does not import transformers."""

from __future__ import annotations

import torch
from torch import nn

from gradood.persample._grads import DenseLayerGradients, outer_product_sums, register_grad_rule
from gradood.persample._rules import RuleResult, features_last, register_rule, sum_of_outer_products_sq_norm

CONV1D = "transformers.pytorch_utils.Conv1D"
features_last(CONV1D)


def _rows(inputs: torch.Tensor, grad_output: torch.Tensor):
    batch = inputs.shape[0]
    return inputs.reshape(batch, -1, inputs.shape[-1]), grad_output.reshape(batch, -1, grad_output.shape[-1])


@register_rule(CONV1D)
def conv1d_rule(module: nn.Module, inputs: torch.Tensor, grad_output: torch.Tensor) -> RuleResult:
    """weight: ‖Σ_t a_t g_tᵀ‖² (the linear identity); bias: ‖Σ_t g_t‖²."""
    activations, grads = _rows(inputs, grad_output)
    result = sum_of_outer_products_sq_norm(activations, grads)
    if module.bias is not None:
        result.squared_norms["bias"] = grads.sum(1).square().sum(1)
    return result


@register_grad_rule(CONV1D)
def conv1d_grads(module: nn.Module, inputs: torch.Tensor, grad_output: torch.Tensor) -> DenseLayerGradients:
    """weight: Σ_t a_t g_tᵀ [in, out] (the stored layout); bias: Σ_t g_t."""
    activations, grads = _rows(inputs, grad_output)
    numels = {"weight": module.get_parameter("weight").numel()}
    if module.bias is not None:
        numels["bias"] = module.get_parameter("bias").numel()

    def materialise(start: int, end: int):
        g = grads[start:end]
        chunk = {"weight": outer_product_sums(g, activations[start:end]).reshape(end - start, -1)}
        if module.bias is not None:
            chunk["bias"] = g.sum(1)
        return chunk

    return DenseLayerGradients(inputs.shape[0], numels, materialise)
