"""Scores backed by the compiled operators: the names of `gradood.reference`,
computed from one pass of `torch.ops.gradood.lastlayer_terms`.

Every function returns an ID-score of shape [B] (higher = more
in-distribution) in float32, or float64 for float64 inputs; half-precision
inputs are accumulated in float32. Formulas, papers and signs: the docstrings
of `gradood.reference`, which is the oracle these are tested against.
To get several scores from a single pass, call `lastlayer_terms` once and
combine its columns.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from gradood import reference
from gradood._checks import check_choice, check_kernel_dtype, check_optional_clip, check_positive, check_real
from gradood._ops import TERM_NAMES, LastLayerTerms, lastlayer_terms

__all__ = [
    "lastlayer_terms",
    "LastLayerTerms",
    "TERM_NAMES",
    "msp",
    "max_logit",
    "energy",
    "gradnorm",
    "exgrad",
    "grodin_last_layer",
    "rg",
    "rg_additive",
    "uv",
    "react",
    "kl_matching",
    "lastlayer_grad_norm",
]

_PREFIX = "gradood.scores."

#: (loss, p) pairs whose norms come out of the kernel's terms.
KERNEL_GRAD_NORMS = (("kl_uniform", 1.0), ("ce_pred", 2.0), ("expected_ce", 1.0), ("energy", 1.0))


def _feature_norm(terms: LastLayerTerms, p: float, include_bias: bool) -> torch.Tensor:
    if p == 1.0:
        norm = terms.column("feature_l1")
        return norm + 1 if include_bias else norm
    norm = terms.column("feature_l2")
    return torch.sqrt(norm * norm + 1) if include_bias else norm


def msp(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Maximum softmax probability at temperature T. See gradood.reference.msp."""
    return lastlayer_terms(logits, None, temperature, where=_PREFIX + "msp").column("max_softmax")


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """Maximum logit. See gradood.reference.max_logit."""
    return lastlayer_terms(logits, None, 1.0, where=_PREFIX + "max_logit").column("max_logit")


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T · logsumexp(f / T). See gradood.reference.energy."""
    return lastlayer_terms(logits, None, temperature, where=_PREFIX + "energy").column("energy")


def gradnorm(
    logits: torch.Tensor,
    features: torch.Tensor,
    temperature: float = 1.0,
    scale: str = "paper",
    include_bias: bool = False,
) -> torch.Tensor:
    """GradNorm, (Σ_j |p_j - 1/C| / T) · ‖v‖_1 (×C for scale="official").
    See gradood.reference.gradnorm."""
    where = _PREFIX + "gradnorm"
    scale = check_choice(where, "scale", scale, ("paper", "official"))
    terms = lastlayer_terms(logits, features, temperature, where=where)
    output_term = terms.column("uniform_deviation_l1") / temperature
    if scale == "official":
        output_term = output_term * logits.shape[1]
    return output_term * _feature_norm(terms, 1.0, include_bias)


def exgrad(logits: torch.Tensor, features: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ExGrad, -(2 / T) · Σ_j p_j (1 - p_j) · ‖v‖_1. See gradood.reference.exgrad."""
    terms = lastlayer_terms(logits, features, temperature, where=_PREFIX + "exgrad")
    return (-2 / temperature) * terms.column("gini") * terms.column("feature_l1")


def grodin_last_layer(
    logits: torch.Tensor,
    features: torch.Tensor,
    temperature: float = 1.0,
    include_bias: bool = True,
) -> torch.Tensor:
    """GRODIN's last-layer term, -(‖p - e_ŷ‖_2 / T) · ‖[v, 1]‖_2.
    See gradood.reference.grodin_last_layer."""
    terms = lastlayer_terms(logits, features, temperature, where=_PREFIX + "grodin_last_layer")
    return -(terms.column("onehot_deviation_l2") / temperature) * _feature_norm(terms, 2.0, include_bias)


def rg(logits: torch.Tensor, features: torch.Tensor, clip: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """RG, T · logsumexp(f / T) · Σ_i min(|v_i|, clip). See gradood.reference.rg."""
    terms = lastlayer_terms(logits, features, temperature, clip, where=_PREFIX + "rg")
    return terms.column("energy") * terms.column("feature_clipped_l1")


def rg_additive(logits: torch.Tensor, features: torch.Tensor, clip: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """Additive RG, logsumexp(f) + α · Σ_i min(|v_i|, clip). See gradood.reference.rg_additive."""
    where = _PREFIX + "rg_additive"
    alpha = check_real(where, "alpha", alpha)
    terms = lastlayer_terms(logits, features, 1.0, clip, where=where)
    return terms.column("energy") + alpha * terms.column("feature_clipped_l1")


def uv(
    logits: torch.Tensor,
    features: torch.Tensor,
    u: str = "energy",
    v: str = "l1",
    clip: Optional[float] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The U·V family, U(f) · V(v). See gradood.reference.uv for the terms."""
    where = _PREFIX + "uv"
    u = check_choice(where, "u", u, reference.U_TERMS)
    v = check_choice(where, "v", v, reference.V_TERMS)
    clip = check_optional_clip(where, clip, needed=v == "clipped_l1")
    terms = lastlayer_terms(logits, features, temperature, math.inf if clip is None else clip, where=where)
    if u == "msp":
        output_term = terms.column("max_softmax")
    elif u == "energy":
        output_term = terms.column("energy")
    elif u == "max_logit":
        output_term = terms.column("max_logit")
    elif u == "gradnorm":
        output_term = terms.column("uniform_deviation_l1") / temperature
    else:
        output_term = (-2 / temperature) * terms.column("gini")
    feature_column = {"l1": "feature_l1", "l2": "feature_l2", "clipped_l1": "feature_clipped_l1"}[v]
    return output_term * terms.column(feature_column)


def lastlayer_grad_norm(
    logits: torch.Tensor,
    features: torch.Tensor,
    loss: str,
    p: float,
    temperature: float = 1.0,
    include_bias: bool = False,
) -> torch.Tensor:
    """Raw last-layer gradient norm ‖δ‖_p · ‖v‖_p (see gradood.reference.lastlayer_grad_norm)
    for the (loss, p) pairs the kernel computes: ("kl_uniform", 1), ("ce_pred", 2),
    ("expected_ce", 1) and ("energy", 1). Other pairs raise; the reference
    computes any p >= 1."""
    where = _PREFIX + "lastlayer_grad_norm"
    loss = check_choice(where, "loss", loss, reference.LOSSES)
    p = check_positive(where, "p", p)
    if (loss, p) not in KERNEL_GRAD_NORMS:
        supported = ", ".join(f"({name!r}, {int(order)})" for name, order in KERNEL_GRAD_NORMS)
        raise ValueError(
            f"{where}: (loss, p) = ({loss!r}, {p:g}) has no kernel; supported: {supported}. "
            "gradood.reference.lastlayer_grad_norm computes any p >= 1."
        )
    terms = lastlayer_terms(logits, features, temperature, where=where)
    if loss == "kl_uniform":
        delta_norm = terms.column("uniform_deviation_l1") / temperature
    elif loss == "ce_pred":
        delta_norm = terms.column("onehot_deviation_l2") / temperature
    elif loss == "expected_ce":
        delta_norm = (2 / temperature) * terms.column("gini")
    else:  # energy: δ = p, ‖p‖_1 = 1
        delta_norm = torch.ones_like(terms.column("energy"))
    return delta_norm * _feature_norm(terms, p, include_bias)


def react(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    clip: float,
) -> torch.Tensor:
    """ReAct, logsumexp(W min(v, c) + b): the product on the GEMM library, the
    energy on lastlayer_terms. See gradood.reference.react."""
    where = _PREFIX + "react"
    # The reference's checks are the public contract; reuse them, then compute.
    clip = reference._check_react_inputs(where, features, weight, bias, clip)
    check_kernel_dtype(where, "features", features)
    logits = F.linear(features.clamp_max(clip), weight, bias)
    return lastlayer_terms(logits, None, 1.0, where=where).column("energy")


def kl_matching(logits: torch.Tensor, templates: torch.Tensor, mode: str = "min") -> torch.Tensor:
    """KL matching, negated. Composed of ATen ops (a log-softmax and one GEMM
    against the templates, which dominates), so it is the reference's code.
    See gradood.reference.kl_matching."""
    return reference.kl_matching(logits, templates, mode)
