"""Per-sample gradients of one layer as a linear operator, never the N×|θ| matrix.

The norm rules (_rules.py) reduce each sample's gradient to one number. The
low-dimensional-gradient method needs three other reductions of the per-sample
gradients G [n, p] of a layer's parameters over a batch of n samples:

    project(M)       G Mᵀ               [n, K]   (M: K directions [K, p])
    weighted_sum(W)  Wᵀ G               [L, p]   (W: [n, L] sample weights)
    moments()        batch mean of G, and Σ_i (G_i − mean)²        [p], [p]

A gradient rule (registered per module class, like the norm rules) returns a
LayerGradients: either DenseLayerGradients, which materialises G for a bounded
chunk of samples at a time (≤ _CHUNK_ELEMENTS elements) and reduces each chunk
with one matrix product, or a class with its own reductions (Embedding, whose
per-sample gradient is sparse). Parameters are keyed by the module's own names;
every tensor G or M of a parameter is flattened to [*, numel].

Materialising a chunk then multiplying is the cheapest order for these
reductions: for a linear layer with T positions, G_i = Σ_t g_t a_tᵀ costs
T·p·d per sample and projecting it K·p·d, while projecting before the sum over
t (Σ_t g_tᵀ M_k a_t) costs T·K·p·d.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, Tuple, TypeVar

import torch
from torch import nn

from gradood.persample._rules import _CHUNK_ELEMENTS

#: Per-sample gradients [c, numel] by parameter name, for one chunk of samples.
Chunk = Dict[str, torch.Tensor]

# Elements of the float32 copy of a half-precision direction block (≈64 MB).
_UPCAST_ELEMENTS = 1 << 24


def mixed_matmul(left: torch.Tensor, right_t: torch.Tensor) -> torch.Tensor:
    """left [n, p] @ right_tᵀ (right_t [K, p]) in left's dtype. A lower-precision
    right_t (bfloat16/float16 storage): on CUDA, left is rounded to that dtype for
    one tensor-core GEMM accumulating and returning float32; elsewhere right_t is
    upcast in blocks of columns, so its float32 copy stays bounded."""
    if right_t.dtype == left.dtype:
        return left @ right_t.T
    if left.is_cuda and left.dtype == torch.float32 and right_t.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(left.to(right_t.dtype), right_t.T, out_dtype=torch.float32)
    block = max(1, _UPCAST_ELEMENTS // max(1, right_t.shape[0]))
    out = left.new_zeros(left.shape[0], right_t.shape[0])
    for start in range(0, left.shape[1], block):
        out.addmm_(left[:, start : start + block], right_t[:, start : start + block].to(left.dtype).T)
    return out


class LayerGradients:
    """The per-sample gradients of a layer's selected parameters for one batch."""

    count: int  # samples in the batch
    numels: Dict[str, int]  # parameter name -> number of elements

    def project(self, directions: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_params G_param @ directions[param]ᵀ: [n, K] (directions [K, numel])."""
        raise NotImplementedError

    def weighted_sum(self, weights: torch.Tensor) -> Dict[str, torch.Tensor]:
        """weightsᵀ G per parameter: [L, numel] (weights [n, L])."""
        raise NotImplementedError

    def moments(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Per parameter: (mean over the batch [numel], Σ_i (G_i − mean)² [numel])."""
        raise NotImplementedError

    def restrict(self, names: Tuple[str, ...]) -> LayerGradients:
        """The same gradients for these parameters only (those the caller selected)."""
        if set(names) != set(self.numels):
            raise NotImplementedError(f"{type(self).__name__} cannot drop parameters")
        return self


class DenseLayerGradients(LayerGradients):
    """Per-sample gradients from `materialise(start, end) -> Chunk`, called on
    sample ranges small enough that one chunk holds ≤ _CHUNK_ELEMENTS elements
    beyond what `per_sample_cost` elements per sample the rule reports."""

    def __init__(
        self, count: int, numels: Dict[str, int], materialise: Callable[[int, int], Chunk], per_sample_cost: int = 0
    ):
        self.count, self.numels, self._materialise = count, dict(numels), materialise
        self._per_sample_cost = per_sample_cost
        self._chunk = max(1, _CHUNK_ELEMENTS // max(1, sum(numels.values()), per_sample_cost))

    def restrict(self, names):
        if set(names) == set(self.numels):
            return self
        materialise = self._materialise
        return DenseLayerGradients(
            self.count,
            {name: self.numels[name] for name in names},
            lambda start, end: {name: value for name, value in materialise(start, end).items() if name in names},
            self._per_sample_cost,
        )

    def chunks(self) -> Iterator[Tuple[int, int, Chunk]]:
        for start in range(0, self.count, self._chunk):
            end = min(self.count, start + self._chunk)
            yield start, end, self._materialise(start, end)

    def project(self, directions):
        pieces = []
        for _, _, chunk in self.chunks():
            out = None
            for name, grads in chunk.items():
                term = mixed_matmul(grads, directions[name])
                out = term if out is None else out.add_(term)
            pieces.append(out)
        return torch.cat(pieces)

    def weighted_sum(self, weights):
        sums: Dict[str, torch.Tensor] = {}
        for start, end, chunk in self.chunks():
            w = weights[start:end]
            for name, grads in chunk.items():
                term = w.to(grads.dtype).T @ grads
                sums[name] = term if name not in sums else sums[name].add_(term)
        return sums

    def moments(self):
        # Two sweeps: the batch mean, then squared deviations from it (no cancellation).
        totals: Dict[str, torch.Tensor] = {}
        for _, _, chunk in self.chunks():
            for name, grads in chunk.items():
                total = grads.sum(0)
                totals[name] = total if name not in totals else totals[name].add_(total)
        means = {name: total / self.count for name, total in totals.items()}
        squares: Dict[str, torch.Tensor] = {}
        for _, _, chunk in self.chunks():
            for name, grads in chunk.items():
                deviation = (grads - means[name]).square().sum(0)
                squares[name] = deviation if name not in squares else squares[name].add_(deviation)
        return {name: (means[name], squares[name]) for name in means}


GradRule = Callable[[nn.Module, torch.Tensor, torch.Tensor], LayerGradients]

_GRAD_RULES: Dict[object, GradRule] = {}  # by class or qualified class name


_AnyGradRule = TypeVar("_AnyGradRule", bound=Callable[..., "LayerGradients"])


def register_grad_rule(*module_types):
    """Registers the decorated function (module, input, grad_output) -> LayerGradients
    as the per-sample gradient rule of these module classes (exact classes, or
    qualified class names)."""

    def decorate(rule: _AnyGradRule) -> _AnyGradRule:
        for module_type in module_types:
            _GRAD_RULES[module_type] = rule
        return rule

    return decorate


def grad_rule_for(module: nn.Module):
    found = _GRAD_RULES.get(type(module))
    if found is not None:
        return found
    return _GRAD_RULES.get(f"{type(module).__module__}.{type(module).__qualname__}")


def outer_product_sums(activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Per sample Σ_t g_t a_tᵀ for activations [n, T, d] and grads [n, T, p]: [n, p, d]."""
    if activations.shape[1] == 1:
        return grads.transpose(1, 2) * activations
    return torch.bmm(grads.transpose(1, 2), activations)
