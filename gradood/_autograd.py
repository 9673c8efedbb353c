"""Backward formulas of the score operators (lastlayer_terms, lastlayer_score,
react_energy), registered with torch.library.register_autograd, so that eager,
compiled and exported graphs work whether or not the logits and features require
grad (energy-regularised fine-tuning trains on exactly these scores).

With p = softmax(f / T), ŷ = argmax f (first of ties), e = one-hot(ŷ):

    max_logit             ∂/∂f = e
    energy                ∂/∂f = p
    max_softmax           ∂/∂f = p_ŷ (e − p) / T
    uniform_deviation_l1  ∂/∂f = p ⊙ (s − ⟨s, p⟩) / T,     s = sign(p − 1/C)
    gini                  ∂/∂f = −2 p ⊙ (p − ⟨p, p⟩) / T
    onehot_deviation_l2   ∂/∂f = p ⊙ (r − ⟨r, p⟩) / (T ‖r‖),  r = p − e   (0 where r = 0)
    feature_l1            ∂/∂v = sign(v)
    feature_l2            ∂/∂v = v / ‖v‖                       (0 where v = 0)
    feature_clipped_l1    ∂/∂v = sign(v) · [|v| < clip]

with_bias replaces V by V + 1 (same derivative) or √(V² + 1) (∂/∂v = v / √(‖v‖² + 1)).
At the kinks (ties for the max, p_j = 1/C, v_i = 0, |v_i| = clip) these are one
subgradient. The terms are recomputed by the forward kernel inside the backward;
the formulas run in float32 (float64 for float64 inputs) and the gradients are
returned in the inputs' dtypes.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

_LOGIT_TERMS = ("max_logit", "energy", "max_softmax", "uniform_deviation_l1", "gini", "onehot_deviation_l2")
_FEATURE_TERMS = ("feature_l1", "feature_l2", "feature_clipped_l1")


def _compute(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.double() if tensor.dtype == torch.float64 else tensor.float()


def _logit_term_grads(logits: torch.Tensor, temperature: float, wanted: List[str]) -> dict:
    """∂U/∂f [B, C] for each logit term in `wanted`."""
    f = _compute(logits)
    count = f.shape[1]
    argmax = f.argmax(dim=1)
    onehot = F.one_hot(argmax, count).to(f.dtype) if count else f.new_zeros(f.shape)
    out = {}
    if "max_logit" in wanted:
        out["max_logit"] = onehot
    if not set(wanted) - {"max_logit"}:
        return out
    p = torch.softmax(f / temperature, dim=1)
    if "energy" in wanted:
        out["energy"] = p
    if "max_softmax" in wanted:
        out["max_softmax"] = p.gather(1, argmax[:, None]) * (onehot - p) / temperature
    if "uniform_deviation_l1" in wanted:
        sign = torch.sign(p - 1.0 / count)
        out["uniform_deviation_l1"] = p * (sign - (sign * p).sum(1, keepdim=True)) / temperature
    if "gini" in wanted:
        out["gini"] = -2.0 * p * (p - (p * p).sum(1, keepdim=True)) / temperature
    if "onehot_deviation_l2" in wanted:
        r = p - onehot
        length = r.norm(dim=1, keepdim=True)
        direction = p * (r - (r * p).sum(1, keepdim=True)) / temperature
        out["onehot_deviation_l2"] = torch.where(
            length > 0, direction / length.clamp_min(torch.finfo(f.dtype).tiny), torch.zeros_like(direction)
        )
    return out


def _feature_term_grad(features: torch.Tensor, term: str, clip: float, with_bias: bool = False) -> torch.Tensor:
    """∂V'/∂v [B, D] of one feature term (V' = V, or its bias-extended form)."""
    v = _compute(features)
    if term == "feature_l1":
        return torch.sign(v)
    if term == "feature_clipped_l1":
        return torch.sign(v) * (v.abs() < clip).to(v.dtype)
    squared = v.square().sum(1, keepdim=True)
    length = (squared + 1.0).sqrt() if with_bias else squared.sqrt()
    return torch.where(length > 0, v / length.clamp_min(torch.finfo(v.dtype).tiny), torch.zeros_like(v))


def _as(grad: Optional[torch.Tensor], like: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if grad is None or like is None else grad.to(like.dtype)


# -- lastlayer_terms ------------------------------------------------------------------


def _terms_setup(ctx, inputs, output) -> None:
    logits, features, temperature, clip = inputs
    ctx.save_for_backward(logits, features)
    ctx.temperature, ctx.clip = temperature, clip


def _terms_backward(ctx, grad_terms, _grad_argmax):
    from gradood._ops import NUM_LOGIT_TERMS, TERM_NAMES

    logits, features = ctx.saved_tensors
    grad_terms = _compute(grad_terms)
    grad_logits = grad_features = None
    if ctx.needs_input_grad[0]:
        parts = _logit_term_grads(logits, ctx.temperature, list(TERM_NAMES[:NUM_LOGIT_TERMS]))
        grad_logits = sum(
            grad_terms[:, index, None] * parts[name] for index, name in enumerate(TERM_NAMES[:NUM_LOGIT_TERMS])
        )
    if features is not None and ctx.needs_input_grad[1]:
        grad_features = sum(
            grad_terms[:, index, None] * _feature_term_grad(features, name, ctx.clip)
            for index, name in enumerate(TERM_NAMES)
            if index >= NUM_LOGIT_TERMS
        )
    return _as(grad_logits, logits), _as(grad_features, features), None, None


# -- lastlayer_score ------------------------------------------------------------------


def _score_setup(ctx, inputs, output) -> None:
    logits, features, logit_term, logit_scale, feature_term, with_bias, combine, alpha, temperature, clip = inputs
    ctx.save_for_backward(logits, features)
    ctx.spec = (logit_term, logit_scale, feature_term, with_bias, combine, alpha, temperature, clip)


def _score_backward(ctx, grad_score):
    from gradood._ops import TERM_NAMES

    logits, features = ctx.saved_tensors
    logit_term, logit_scale, feature_term, with_bias, combine, alpha, temperature, clip = ctx.spec
    grad = _compute(grad_score)[:, None]
    product = feature_term >= 0 and combine == 0
    u_name = TERM_NAMES[logit_term]
    terms = None
    if product:  # the factors themselves, from the forward kernel
        terms = _compute(torch.ops.gradood.lastlayer_terms(logits, features, temperature, clip)[0])
    grad_logits = grad_features = None
    if ctx.needs_input_grad[0]:
        scale = grad * logit_scale
        if product:
            v = terms[:, feature_term : feature_term + 1]
            if with_bias:
                v = (v.square() + 1.0).sqrt() if TERM_NAMES[feature_term] == "feature_l2" else v + 1.0
            scale = scale * v
        grad_logits = scale * _logit_term_grads(logits, temperature, [u_name])[u_name]
    if feature_term >= 0 and ctx.needs_input_grad[1]:
        weight = grad * (logit_scale * terms[:, logit_term : logit_term + 1] if product else alpha)
        grad_features = weight * _feature_term_grad(features, TERM_NAMES[feature_term], clip, with_bias)
    return (_as(grad_logits, logits), _as(grad_features, features)) + (None,) * 8


# -- react_energy ---------------------------------------------------------------------


def _react_setup(ctx, inputs, output) -> None:
    features, weight, bias, clip = inputs
    ctx.save_for_backward(features, weight, bias)
    ctx.clip = clip


def _react_backward(ctx, grad_score):
    features, weight, bias = ctx.saved_tensors
    clipped = _compute(features).clamp_max(ctx.clip)
    w = _compute(weight)
    logits = F.linear(clipped, w, None if bias is None else _compute(bias))
    dlogits = _compute(grad_score)[:, None] * torch.softmax(logits, dim=1)  # ∂ log Σ exp / ∂ logits = softmax
    grad_features = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:  # clamp_max passes the gradient where v ≤ clip, as torch's clamp does
        grad_features = (dlogits @ w) * (_compute(features) <= ctx.clip).to(w.dtype)
    if ctx.needs_input_grad[1]:
        grad_weight = dlogits.transpose(0, 1) @ clipped
    if bias is not None and ctx.needs_input_grad[2]:
        grad_bias = dlogits.sum(0)
    return _as(grad_features, features), _as(grad_weight, weight), _as(grad_bias, bias), None


def register() -> None:
    torch.library.register_autograd("gradood::lastlayer_terms", _terms_backward, setup_context=_terms_setup)
    torch.library.register_autograd("gradood::lastlayer_score", _score_backward, setup_context=_score_setup)
    torch.library.register_autograd("gradood::react_energy", _react_backward, setup_context=_react_setup)
