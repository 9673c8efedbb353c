"""The opt-in fallback for modules without a norm rule (fallback="torch.func"):
the module's per-sample gradients from torch.func, materialised for the given
parameters only: its own, and those of layers inside it that the layout probe
handed over to it (gradood/persample/_layout.py).

For a module called once with one input tensor x (batch first) and receiving the
output gradient g, sample i's gradient w.r.t. the module's own parameters θ is
∇_θ ⟨g_i, module_θ(x_i)⟩, computed for every i with vmap(grad(...)), or, where
vmap cannot batch the module's ops (nn.LSTM/GRU's fused kernels), with grad(...)
in a loop over the samples. Exact for any module whose output for a sample
depends only on that sample's input; it costs a per-sample forward and backward
of the module, and B × |θ| memory.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from gradood.persample._grads import DenseLayerGradients
from gradood.persample._rules import RuleResult


def _per_sample_grads(module: nn.Module, inputs: torch.Tensor, grad_output: torch.Tensor, names: Tuple[str, ...]):
    own = {name: module.get_parameter(name) for name in names}
    constants = {
        name: tensor.detach()
        for name, tensor in (*module.named_parameters(), *module.named_buffers())
        if name not in own
    }

    def inner_product(parameters, sample, sample_grad):
        output = torch.func.functional_call(module, {**parameters, **constants}, (sample.unsqueeze(0),))
        return (output * sample_grad.unsqueeze(0)).sum()

    detached = {name: parameter.detach() for name, parameter in own.items()}
    try:
        return torch.func.vmap(torch.func.grad(inner_product), in_dims=(None, 0, 0))(detached, inputs, grad_output)
    except RuntimeError:  # an op vmap cannot batch: one sample at a time
        one = torch.func.grad(inner_product)
        grads = [one(detached, inputs[index], grad_output[index]) for index in range(inputs.shape[0])]
        return {name: torch.stack([grad[name] for grad in grads]) for name in own}


def torch_func_rule(
    module: nn.Module, inputs: torch.Tensor, grad_output: torch.Tensor, names: Tuple[str, ...]
) -> RuleResult:
    per_sample = _per_sample_grads(module, inputs, grad_output, names)
    batch = inputs.shape[0]
    return RuleResult(
        {name: grad.reshape(batch, -1).square().sum(1) for name, grad in per_sample.items()}, "torch.func"
    )


def torch_func_grads(
    module: nn.Module, inputs: torch.Tensor, grad_output: torch.Tensor, names: Tuple[str, ...]
) -> DenseLayerGradients:
    """The same per-sample gradients, materialised per chunk of samples."""
    numels = {name: module.get_parameter(name).numel() for name in names}

    def materialise(start, end):
        grads = _per_sample_grads(module, inputs[start:end], grad_output[start:end], names)
        return {name: grad.reshape(end - start, -1) for name, grad in grads.items()}

    return DenseLayerGradients(inputs.shape[0], numels, materialise)
