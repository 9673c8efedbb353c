"""Scores backed by the compiled operators: the names of `gradood.reference`,
each computed in one pass by `torch.ops.gradood.lastlayer_score` (the score is
composed inside the kernel, so one call is one kernel launch).

Every function returns an ID-score of shape [B] (higher = more
in-distribution) in float32, or float64 for float64 inputs; half-precision
inputs are accumulated in float32. Formulas, papers and signs: the docstrings
of `gradood.reference`, which is the oracle these are tested against.
To get several scores from a single pass, call `lastlayer_terms` once and
combine its columns.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from gradood import _ops, reference
from gradood._checks import (
    check_choice,
    check_kernel_dtype,
    check_logits,
    check_optional_clip,
    check_positive,
    check_real,
    check_temperature,
)
from gradood._ops import TERM_NAMES, LastLayerTerms, lastlayer_score, lastlayer_terms

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
    "ScoreSpec",
]

_PREFIX = "gradood.scores."

#: (loss, p) pairs whose norms the kernel computes.
KERNEL_GRAD_NORMS = (("kl_uniform", 1.0), ("ce_pred", 2.0), ("expected_ce", 1.0), ("energy", 1.0))

_FEATURE_TERMS = {"l1": "feature_l1", "l2": "feature_l2", "clipped_l1": "feature_clipped_l1"}


class ScoreSpec(NamedTuple):
    """How `lastlayer_score` composes one score (see gradood._ops.lastlayer_score):
    a logit term (TERM_NAMES) times logit_scale, optionally combined with a
    feature term; the same spec drives gradood.scores and gradood.OODHead."""

    logit_term: str
    logit_scale: float = 1.0
    feature_term: Optional[str] = None
    with_bias: bool = False
    combine: str = "product"
    alpha: float = 0.0
    temperature: float = 1.0
    clip: float = math.inf


def apply_spec(where: str, logits: torch.Tensor, features: Optional[torch.Tensor], spec: ScoreSpec) -> torch.Tensor:
    return lastlayer_score(where, logits, features if spec.feature_term is not None else None, *spec)


def spec_msp(temperature: float = 1.0, where: str = _PREFIX + "msp") -> ScoreSpec:
    return ScoreSpec("max_softmax", temperature=check_temperature(where, temperature))


def spec_max_logit() -> ScoreSpec:
    return ScoreSpec("max_logit")


def spec_energy(temperature: float = 1.0, where: str = _PREFIX + "energy") -> ScoreSpec:
    return ScoreSpec("energy", temperature=check_temperature(where, temperature))


def spec_gradnorm(
    num_classes: int,
    temperature: float = 1.0,
    scale: str = "paper",
    include_bias: bool = False,
    where: str = _PREFIX + "gradnorm",
) -> ScoreSpec:
    scale = check_choice(where, "scale", scale, ("paper", "official"))
    temperature = check_temperature(where, temperature)
    factor = num_classes if scale == "official" else 1
    return ScoreSpec("uniform_deviation_l1", factor / temperature, "feature_l1", include_bias, temperature=temperature)


def spec_exgrad(temperature: float = 1.0, where: str = _PREFIX + "exgrad") -> ScoreSpec:
    temperature = check_temperature(where, temperature)
    return ScoreSpec("gini", -2 / temperature, "feature_l1", temperature=temperature)


def spec_grodin_last_layer(
    temperature: float = 1.0, include_bias: bool = True, where: str = _PREFIX + "grodin_last_layer"
) -> ScoreSpec:
    temperature = check_temperature(where, temperature)
    return ScoreSpec("onehot_deviation_l2", -1 / temperature, "feature_l2", include_bias, temperature=temperature)


def spec_rg(clip: float = 1.0, temperature: float = 1.0, where: str = _PREFIX + "rg") -> ScoreSpec:
    return ScoreSpec(
        "energy",
        1.0,
        "feature_clipped_l1",
        temperature=check_temperature(where, temperature),
        clip=check_positive(where, "clip", clip, allow_inf=True),
    )


def spec_rg_additive(clip: float = 1.0, alpha: float = 1.0, where: str = _PREFIX + "rg_additive") -> ScoreSpec:
    return ScoreSpec(
        "energy",
        1.0,
        "feature_clipped_l1",
        combine="sum",
        alpha=check_real(where, "alpha", alpha),
        clip=check_positive(where, "clip", clip, allow_inf=True),
    )


def spec_uv(
    u: str = "energy",
    v: str = "l1",
    clip: Optional[float] = None,
    temperature: float = 1.0,
    where: str = _PREFIX + "uv",
) -> ScoreSpec:
    u = check_choice(where, "u", u, reference.U_TERMS)
    v = check_choice(where, "v", v, reference.V_TERMS)
    clip = check_optional_clip(where, clip, needed=v == "clipped_l1")
    temperature = check_temperature(where, temperature)
    logit_term, logit_scale = {
        "msp": ("max_softmax", 1.0),
        "energy": ("energy", 1.0),
        "max_logit": ("max_logit", 1.0),
        "gradnorm": ("uniform_deviation_l1", 1 / temperature),
        "exgrad": ("gini", -2 / temperature),
    }[u]
    return ScoreSpec(
        logit_term, logit_scale, _FEATURE_TERMS[v], temperature=temperature, clip=math.inf if clip is None else clip
    )


# The logits-only scores try the plain-CPU fast path first (no spec built): at B=1 the
# Python around the kernel is most of the cost.
_MAX_LOGIT, _ENERGY, _MAX_SOFTMAX = (TERM_NAMES.index(name) for name in ("max_logit", "energy", "max_softmax"))


def msp(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Maximum softmax probability at temperature T. See gradood.reference.msp."""
    score = _ops.plain_cpu_score(logits, None, _MAX_SOFTMAX, 1.0, -1, False, 0, 0.0, temperature, math.inf)
    return score if score is not None else apply_spec(_PREFIX + "msp", logits, None, spec_msp(temperature))


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """Maximum logit. See gradood.reference.max_logit."""
    score = _ops.plain_cpu_score(logits, None, _MAX_LOGIT, 1.0, -1, False, 0, 0.0, 1.0, math.inf)
    return score if score is not None else apply_spec(_PREFIX + "max_logit", logits, None, spec_max_logit())


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T · logsumexp(f / T). See gradood.reference.energy."""
    score = _ops.plain_cpu_score(logits, None, _ENERGY, 1.0, -1, False, 0, 0.0, temperature, math.inf)
    return score if score is not None else apply_spec(_PREFIX + "energy", logits, None, spec_energy(temperature))


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
    check_logits(where, logits)
    return apply_spec(where, logits, features, spec_gradnorm(logits.shape[1], temperature, scale, include_bias))


def exgrad(logits: torch.Tensor, features: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ExGrad, -(2 / T) · Σ_j p_j (1 - p_j) · ‖v‖_1. See gradood.reference.exgrad."""
    return apply_spec(_PREFIX + "exgrad", logits, features, spec_exgrad(temperature))


def grodin_last_layer(
    logits: torch.Tensor,
    features: torch.Tensor,
    temperature: float = 1.0,
    include_bias: bool = True,
) -> torch.Tensor:
    """GRODIN's last-layer term, -(‖p - e_ŷ‖_2 / T) · ‖[v, 1]‖_2.
    See gradood.reference.grodin_last_layer."""
    return apply_spec(
        _PREFIX + "grodin_last_layer", logits, features, spec_grodin_last_layer(temperature, include_bias)
    )


def rg(logits: torch.Tensor, features: torch.Tensor, clip: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """RG, T · logsumexp(f / T) · Σ_i min(|v_i|, clip). See gradood.reference.rg."""
    return apply_spec(_PREFIX + "rg", logits, features, spec_rg(clip, temperature))


def rg_additive(logits: torch.Tensor, features: torch.Tensor, clip: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """Additive RG, logsumexp(f) + α · Σ_i min(|v_i|, clip). See gradood.reference.rg_additive."""
    return apply_spec(_PREFIX + "rg_additive", logits, features, spec_rg_additive(clip, alpha))


def uv(
    logits: torch.Tensor,
    features: torch.Tensor,
    u: str = "energy",
    v: str = "l1",
    clip: Optional[float] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The U·V family, U(f) · V(v). See gradood.reference.uv for the terms."""
    return apply_spec(_PREFIX + "uv", logits, features, spec_uv(u, v, clip, temperature))


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
    temperature = check_temperature(where, temperature)
    feature_term = "feature_l2" if p == 2.0 else "feature_l1"
    if loss == "energy":  # δ = p and ‖p‖_1 = 1: the feature norm alone (0·U keeps NaN rows NaN)
        return lastlayer_score(
            where,
            logits,
            features,
            "energy",
            0.0,
            feature_term,
            with_bias=include_bias,
            combine="sum",
            alpha=1.0,
            temperature=temperature,
        )
    logit_term, logit_scale = {
        "kl_uniform": ("uniform_deviation_l1", 1 / temperature),
        "ce_pred": ("onehot_deviation_l2", 1 / temperature),
        "expected_ce": ("gini", 2 / temperature),
    }[loss]
    return lastlayer_score(
        where, logits, features, logit_term, logit_scale, feature_term, with_bias=include_bias, temperature=temperature
    )


def react(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    clip: float,
) -> torch.Tensor:
    """ReAct, logsumexp(W min(v, c) + b), on the react_energy operator: the
    clip, the device's GEMM library, and the fused energy pass of
    lastlayer_score. Clipped features and logits in the input dtype, as the
    eager composition; float32 scores (float64 for float64 inputs). See
    gradood.reference.react."""
    where = _PREFIX + "react"
    clip = reference._check_react_inputs(where, features, weight, bias, clip)
    check_kernel_dtype(where, "features", features)
    _ops.check_kernels_for(where, "features", features)
    _ops.refuse_unsupported_transforms(where, features, weight, bias)
    with _ops._below_autograd(features, weight, bias):
        return torch.ops.gradood.react_energy(features, weight, bias, clip)


def kl_matching(logits: torch.Tensor, templates: torch.Tensor, mode: str = "min") -> torch.Tensor:
    """KL matching, negated. Composed of ATen ops (a log-softmax and one GEMM
    against the templates, which dominates), so it is the reference's code.
    See gradood.reference.kl_matching."""
    return reference.kl_matching(logits, templates, mode)
