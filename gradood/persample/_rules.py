"""The registry of per-layer norm rules and the contraction they share.

A rule receives a module, the input it was called with and the gradient of the
loss with respect to its output, and returns, for each of the module's
parameters, the per-sample squared gradient norm [B] — never a per-sample
gradient beyond a bounded chunk, never a summed `.grad`.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Type, TypeVar, Union

import torch
from torch import nn

#: Per-sample squared norms by parameter name (the module's own names, e.g. "weight").
SquaredNorms = Dict[str, torch.Tensor]


class RuleResult(NamedTuple):
    squared_norms: SquaredNorms
    method: str  # "ghost", "materialise" or "direct": how the weight's norm was computed


Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor], RuleResult]
# A rule as written: its first parameter typed as the module class it handles.
_AnyRule = TypeVar("_AnyRule", bound=Callable[..., RuleResult])

#: A module class, or the qualified name of one ("timm.layers.std_conv.StdConv2d") for
#: third-party classes, matched when that package is loaded without importing it here.
ModuleType = Union[Type[nn.Module], str]

_RULES: Dict[ModuleType, Rule] = {}
_COMPOSITE_RULES: Dict[ModuleType, CompositeRule] = {}


class CompositeRule:
    """A rule for a module whose parameters are used inside its forward without
    passing through hookable submodules (nn.MultiheadAttention). During the pass
    the engine runs `forward(module, record, *args, **kwargs)` instead of the
    module's own forward; it must compute the same outputs and call
    record(piece, input, output) -> output for every linear piece, using the
    returned tensor downstream. `norms(module, pieces)` then gets, per piece,
    (input, gradient of the loss w.r.t. the piece's output) and returns the
    squared norms keyed by the module's own parameter names ("out_proj.weight")."""

    def forward(self, module: nn.Module, record, *args, **kwargs):
        raise NotImplementedError

    def norms(self, module: nn.Module, pieces: Dict[Optional[str], tuple]) -> RuleResult:
        raise NotImplementedError

    def grads(self, module: nn.Module, pieces: Dict[Optional[str], tuple]):
        """The per-sample gradients as a LayerGradients (gradood.persample._grads),
        keyed like norms()."""
        raise NotImplementedError


# Elements of the largest per-sample intermediate a chunk may hold (≈256 MB in float32).
_CHUNK_ELEMENTS = 1 << 26


def qualified_name(module_type: type) -> str:
    return f"{module_type.__module__}.{module_type.__qualname__}"


def lookup(registry: dict, module: nn.Module):
    """A registry's entry for this module's exact class, by class or by qualified name."""
    found = registry.get(type(module))
    return found if found is not None else registry.get(qualified_name(type(module)))


def register_rule(*module_types: ModuleType):
    """Registers the decorated function as the norm rule of these module classes
    (exact classes, or qualified class names: a subclass with a different forward
    needs its own rule)."""

    def decorate(rule: _AnyRule) -> _AnyRule:
        for module_type in module_types:
            _RULES[module_type] = rule
        return rule

    return decorate


def register_composite_rule(*module_types: ModuleType):
    """Registers the decorated CompositeRule class for these module classes."""

    def decorate(rule_class):
        for module_type in module_types:
            _COMPOSITE_RULES[module_type] = rule_class()
        return rule_class

    return decorate


def rule_for(module: nn.Module):
    """The rule of this module's exact class: a function, a CompositeRule, or None."""
    return lookup(_RULES, module) or lookup(_COMPOSITE_RULES, module)


def prefers_ghost(positions: int, in_features: int, out_features: int) -> bool:
    """FLOP rule: the Gram contraction costs ≈2T²(d+p), materialising ≈2Tdp."""
    return positions * (in_features + out_features) < in_features * out_features


def sum_of_outer_products_sq_norm(activations: torch.Tensor, grads: torch.Tensor) -> RuleResult:
    """Per-sample ‖Σ_t g_t a_tᵀ‖_F² for activations [N, T, d] and grads [N, T, p]
    (N = samples, or samples × groups), by the cheaper of the two identities:

        ghost:       Σ_{t,s} ⟨a_t, a_s⟩ ⟨g_t, g_s⟩
        materialise: ‖G‖_F² with G = Σ_t g_t a_tᵀ  (p × d per sample)

    The kernels (gradood::outer_product_sq_norm) process chunks of samples on
    the CPU so no intermediate exceeds 2^26 elements, and never write G or a
    Gram matrix on CUDA. Returns [N] in the grads' dtype.
    """
    positions, in_features = activations.shape[1:]
    if positions == 1:  # Goodfellow's identity: ‖a‖² ‖g‖²
        squared = activations.square().sum((1, 2)) * grads.square().sum((1, 2))
        return RuleResult({"weight": squared}, "direct")
    method = "ghost" if prefers_ghost(positions, in_features, grads.shape[2]) else "materialise"
    squared = torch.ops.gradood.outer_product_sq_norm(activations, grads, method)
    return RuleResult({"weight": squared.to(grads.dtype)}, method)


# Features-last module types: their rules see positions then features, so the
# batch may sit in any dimension of the input (a sequence-first [T, B, E]); the
# engine moves it to the front. Others (conv, batch and group norm) need it first.
_BATCH_MAY_MOVE: set = {nn.Linear, nn.LayerNorm, nn.Embedding} | ({nn.RMSNorm} if hasattr(nn, "RMSNorm") else set())


def features_last(*module_types: ModuleType) -> None:
    """Declares these classes features-last: their rule sees positions then features."""
    _BATCH_MAY_MOVE.update(module_types)


def batch_may_move(module: nn.Module) -> bool:
    return type(module) in _BATCH_MAY_MOVE or qualified_name(type(module)) in _BATCH_MAY_MOVE
