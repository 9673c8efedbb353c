"""nn.Linear on inputs of any rank: [B, d], [B, T, d], [B, *, d]: the norm rule
and the per-sample gradient rule."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from gradood.persample._grads import DenseLayerGradients, mixed_matmul, outer_product_sums, register_grad_rule
from gradood.persample._rules import _CHUNK_ELEMENTS, RuleResult, register_rule, sum_of_outer_products_sq_norm


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


class RankOneGradients(DenseLayerGradients):
    """A linear layer on 2-D input: each sample's weight gradient is the rank-one
    g_i a_iᵀ, so projections and weighted sums never form it:

        ⟨g aᵀ, M_k⟩ = gᵀ (M_k a)      all k at once: a @ M.view(K·p, d)ᵀ, then · g
        Σ_i w_il g_i a_iᵀ            (w ⊗ g).view(n, L·p)ᵀ @ a

    (the same multiply-adds as materialising then multiplying, with an [n, K·p]
    instead of an [n, p·d] intermediate: used when K < d, i.e. when smaller).
    Moments materialise bounded chunks."""

    def __init__(self, activations: torch.Tensor, grads: torch.Tensor, names: Tuple[str, ...], materialise):
        out_features, in_features = grads.shape[1], activations.shape[1]
        numels = {"weight": out_features * in_features, "bias": out_features}
        super().__init__(activations.shape[0], {n: numels[n] for n in names}, materialise)
        self.activations, self.grads, self.names = activations, grads, names

    def restrict(self, names):
        if set(names) == set(self.numels):
            return self
        materialise = self._materialise
        return RankOneGradients(
            self.activations,
            self.grads,
            tuple(names),
            lambda s, e: {n: v for n, v in materialise(s, e).items() if n in names},
        )

    def _rows(self, width: int) -> int:
        return max(1, _CHUNK_ELEMENTS // max(1, width))

    def project(self, directions):
        count = next(iter(directions.values())).shape[0]
        if count >= self.activations.shape[1]:
            return super().project(directions)
        out = self.grads.new_zeros(self.count, count)
        if "weight" in self.names:
            weight = directions["weight"]
            out_features, in_features = self.grads.shape[1], self.activations.shape[1]
            stacked = weight.reshape(count * out_features, in_features)
            rows = self._rows(count * out_features)
            for start in range(0, self.count, rows):
                a, g = self.activations[start : start + rows], self.grads[start : start + rows]
                products = mixed_matmul(a, stacked).view(-1, count, out_features)  # M_k a
                out[start : start + rows] += torch.bmm(products, g.unsqueeze(2)).squeeze(2)
        if "bias" in self.names:
            out += mixed_matmul(self.grads, directions["bias"])
        return out

    def weighted_sum(self, weights):
        if weights.shape[1] >= self.activations.shape[1]:
            return super().weighted_sum(weights)
        weights = weights.to(self.grads.dtype)
        columns, out_features = weights.shape[1], self.grads.shape[1]
        sums: Dict[str, torch.Tensor] = {}
        if "weight" in self.names:
            total = None
            rows = self._rows(columns * out_features)
            for start in range(0, self.count, rows):
                w, g = weights[start : start + rows], self.grads[start : start + rows]
                scaled = (w.unsqueeze(2) * g.unsqueeze(1)).reshape(w.shape[0], columns * out_features)
                term = scaled.T @ self.activations[start : start + rows]
                total = term if total is None else total.add_(term)
            sums["weight"] = total.reshape(columns, -1)
        if "bias" in self.names:
            sums["bias"] = weights.T @ self.grads
        return sums


@register_grad_rule(nn.Linear)
def linear_grads(module: nn.Linear, inputs: torch.Tensor, grad_output: torch.Tensor) -> DenseLayerGradients:
    """weight: G_i = Σ_t g_t a_tᵀ [p, d]; bias: Σ_t g_t [p]. On 2-D input (one
    position) a RankOneGradients, which projects without forming G_i."""
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

    if activations.shape[1] == 1:
        return RankOneGradients(activations[:, 0], grads[:, 0], tuple(numels), materialise)
    return DenseLayerGradients(batch, numels, materialise)
