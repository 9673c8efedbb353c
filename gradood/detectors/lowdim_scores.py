"""LowDimGrad's base scores on the low-dimensional gradients x = G_low [B, K], all
ID-high ("Low-Dimensional Gradient Helps Out-of-Distribution Detection", Wu et al.,
TPAMI 2024, combines G_low with each of them).

Through the linear probe (gradood.detectors.lowdim_probe; in eval mode
h = s ⊙ x + t, f = W h + b, p = softmax(f / T)):

- "msp":      max_j p_j                                      (Hendrycks & Gimpel, ICLR 2017, arXiv:1610.02136)
- "energy":   T · log Σ_j exp(f_j / T)                       (Liu et al., NeurIPS 2020, arXiv:2010.03759)
- "odin":     max_j softmax(f(x̃) / T)_j,  x̃ = x − ε · sign(∇_x CE(f(x) / T, ŷ)), sign(0) = +1,
              in closed form: ∇_x CE = (W diag(s))ᵀ (p − e_ŷ) / T   (Liang et al., ICLR 2018, arXiv:1706.02690)
- "gradnorm": (Σ_j |p_j − 1/C|) · ‖h‖₁, the L1 norm of the gradient of KL(u ‖ p) w.r.t. W
              (Huang et al., NeurIPS 2021, arXiv:2110.00218)
- "react":    energy of f(x'), x'_k = min(x_k, c) for k ≥ start (x'_k = x_k below), c an ID
              percentile of those coordinates   (Sun et al., NeurIPS 2021, arXiv:2111.12797)
- "bats":     energy of W h' + b, h' = clamp(h, β − λ|γ|, β + λ|γ|): the BatchNorm output
              truncated to λ of its own standard deviation γ around its mean β
              (Zhu et al., NeurIPS 2022, arXiv:2210.04200)

Without the probe: "knn" (gradood.knn) and "mahalanobis" (gradood.mahalanobis) on G_low.
"""

from __future__ import annotations

import torch

from gradood import scores
from gradood.detectors.lowdim_probe import ProbeState, normalisation

PROBE_SCORES = ("msp", "energy", "odin", "gradnorm", "react", "bats")
DISTANCE_SCORES = ("knn", "mahalanobis")
BASE_SCORES = DISTANCE_SCORES + PROBE_SCORES


def _as(state: ProbeState, x: torch.Tensor) -> ProbeState:
    return {name: value.to(x.device, x.dtype) for name, value in state.items()}


def probe_features(x: torch.Tensor, state: ProbeState) -> torch.Tensor:
    """h = s ⊙ x + t, the eval-mode BatchNorm's output."""
    scale, shift = normalisation(_as(state, x))
    return x * scale + shift


def probe_logits(x: torch.Tensor, state: ProbeState) -> torch.Tensor:
    """f = W h + b."""
    state = _as(state, x)
    return torch.nn.functional.linear(probe_features(x, state), state["weight"], state["bias"])


def msp(x: torch.Tensor, state: ProbeState, temperature: float = 1.0) -> torch.Tensor:
    return scores.msp(probe_logits(x, state), temperature)


def energy(x: torch.Tensor, state: ProbeState, temperature: float = 1.0) -> torch.Tensor:
    return scores.energy(probe_logits(x, state), temperature)


def odin(x: torch.Tensor, state: ProbeState, temperature: float = 1000.0, epsilon: float = 0.0014) -> torch.Tensor:
    state = _as(state, x)
    logits = probe_logits(x, state)
    if epsilon > 0:
        scale, _ = normalisation(state)
        p = torch.softmax(logits / temperature, dim=1)
        p.scatter_add_(1, logits.argmax(1, keepdim=True), -torch.ones_like(p[:, :1]))  # p − e_ŷ
        gradient = (p @ state["weight"]) * scale  # T > 0 does not change the sign
        step = torch.where(gradient >= 0, 1.0, -1.0).to(x.dtype)
        logits = probe_logits(x - epsilon * step, state)
    return scores.msp(logits, temperature)


def gradnorm(x: torch.Tensor, state: ProbeState, temperature: float = 1.0) -> torch.Tensor:
    return scores.gradnorm(probe_logits(x, state), probe_features(x, state), temperature)


def rectified(x: torch.Tensor, start: int, clip: float) -> torch.Tensor:
    """x with coordinates k ≥ start clipped from above at `clip` (NaN stays NaN)."""
    return torch.cat([x[:, :start], x[:, start:].clamp(max=clip)], dim=1)


def react(x: torch.Tensor, state: ProbeState, start: int, clip: float, temperature: float = 1.0) -> torch.Tensor:
    return scores.energy(probe_logits(rectified(x, start, clip), state), temperature)


def truncated_features(x: torch.Tensor, state: ProbeState, lam: float) -> torch.Tensor:
    """h' = clamp(h, β − λ|γ|, β + λ|γ|) (NaN stays NaN)."""
    state = _as(state, x)
    centre, spread = state["norm_bias"], lam * state["norm_weight"].abs()
    return torch.minimum(torch.maximum(probe_features(x, state), centre - spread), centre + spread)


def bats(x: torch.Tensor, state: ProbeState, lam: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    state = _as(state, x)
    logits = torch.nn.functional.linear(truncated_features(x, state, lam), state["weight"], state["bias"])
    return scores.energy(logits, temperature)
