"""Pure-PyTorch definitions of every score: the oracle for the kernels.

Readable rather than fast. Each function computes in the dtype it is given
(pass float64 for reference values) and returns an ID-score of shape [B]:
higher means more in-distribution. The raw gradient-norm
helper `lastlayer_grad_norm` is the exception: it returns the norm itself,
which is OOD-high or ID-high depending on the loss.

Notation: logits f [B, C], penultimate features v [B, D] (the input of the
last linear layer f = W v + b), temperature T, p = softmax(f / T),
ŷ = argmax_j f_j, u = 1 / C.

Numerics: 1 - p_ŷ is computed as the sum of the other classes'
probabilities, never as 1 - p[ŷ], which is pure round-off for confident rows.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from gradood._checks import (
    check_choice,
    check_features,
    check_logits,
    check_matrix,
    check_optional_clip,
    check_positive,
    check_real,
    check_same_dtype_device,
    check_temperature,
)

__all__ = [
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
    "LOSSES",
    "U_TERMS",
    "V_TERMS",
]

#: Losses accepted by `lastlayer_grad_norm`.
LOSSES = ("kl_uniform", "ce_pred", "expected_ce", "energy")
#: Output-space terms of the U·V family (`uv`).
U_TERMS = ("msp", "energy", "max_logit", "gradnorm", "exgrad")
#: Feature-space terms of the U·V family (`uv`).
V_TERMS = ("l1", "l2", "clipped_l1")


class _Softmax(NamedTuple):
    probs: torch.Tensor  # p = softmax(f / T), [B, C]
    one_minus: torch.Tensor  # 1 - p, exact also at ŷ, [B, C]
    is_pred: torch.Tensor  # one-hot of ŷ, bool [B, C]


def _shifted(logits: torch.Tensor):
    """(f − m, m) with m the row max where it is finite (0 elsewhere): (f − m) / T <= 0
    cannot overflow at a finite max, however small T is."""
    row_max = logits.amax(dim=1, keepdim=True)
    shift = torch.where(row_max.isfinite(), row_max, torch.zeros_like(row_max))
    return logits - shift, shift


def _probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(f / T), and its limit on rows whose max is infinite (where torch.softmax
    gives NaN): the logits equal to the max share the mass evenly, so one +inf logit has
    probability 1 and a row of -inf logits is uniform. A NaN logit makes its row NaN."""
    shifted, _ = _shifted(logits)
    probs = torch.softmax(shifted / temperature, dim=1)
    row_max = logits.amax(dim=1, keepdim=True)
    at_max = (logits == row_max).to(probs.dtype)
    limit = at_max / at_max.sum(dim=1, keepdim=True)
    return torch.where(row_max.isinf(), limit, probs)


def _energy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T · log Σ_j exp(f_j / T) as m + T · LSE((f − m) / T), so that f / T overflowing does
    not make a finite energy infinite; ±inf where the max is."""
    shifted, shift = _shifted(logits)
    return temperature * torch.logsumexp(shifted / temperature, dim=1) + shift.squeeze(1)


def _softmax(logits: torch.Tensor, temperature: float) -> _Softmax:
    probs = _probabilities(logits, temperature)
    is_pred = F.one_hot(logits.argmax(dim=1), logits.shape[1]).bool()
    others_mass = probs.masked_fill(is_pred, 0).sum(dim=1, keepdim=True)  # 1 - p_ŷ
    one_minus = torch.where(is_pred, others_mass, 1 - probs)
    # A NaN row stays NaN at ŷ too (with one class there is no other mass to carry it).
    one_minus = torch.where(probs.isnan(), probs, one_minus)
    return _Softmax(probs, one_minus, is_pred)


def _feature_norm(features: torch.Tensor, p: float, include_bias: bool) -> torch.Tensor:
    """‖v‖_p, or ‖[v, 1]‖_p = (‖v‖_p^p + 1)^(1/p) when the bias counts."""
    norm = torch.linalg.vector_norm(features, ord=p, dim=1)
    if not include_bias:
        return norm
    return (norm.pow(p) + 1).pow(1 / p)


def _clipped_l1(features: torch.Tensor, clip: float) -> torch.Tensor:
    """Σ_i min(|v_i|, k): the clipped L1 norm of RG (features are post-ReLU
    in the paper, where |v_i| = v_i; for signed features the magnitude is
    clipped)."""
    return features.abs().clamp_max(clip).sum(dim=1)


def msp(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Maximum softmax probability, max_j softmax(f / T)_j.

    Hendrycks & Gimpel 2017 (T = 1); with T > 1 the temperature-scaled
    baseline of ODIN (Liang et al. 2018). ID-high.
    """
    where = "gradood.reference.msp"
    check_logits(where, logits)
    temperature = check_temperature(where, temperature)
    return _probabilities(logits, temperature).amax(dim=1)


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """Maximum logit, max_j f_j (Hendrycks et al. 2022). ID-high."""
    check_logits("gradood.reference.max_logit", logits)
    return logits.amax(dim=1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Negative free energy, T · log Σ_j exp(f_j / T) (Liu et al. 2020). ID-high."""
    where = "gradood.reference.energy"
    check_logits(where, logits)
    temperature = check_temperature(where, temperature)
    return _energy(logits, temperature)


def _delta_norm(logits: torch.Tensor, loss: str, p: float, temperature: float) -> torch.Tensor:
    """‖δ‖_p with δ = ∂L/∂f for a per-sample loss L (the table of docs/conventions.md); for
    "expected_ce" the expectation E_{y~p} ‖δ_y‖_p of the per-label norms."""
    probs, one_minus, is_pred = _softmax(logits, temperature)
    num_classes = logits.shape[1]
    if loss == "kl_uniform":  # δ = (p - u) / T
        uniform = 1.0 / num_classes
        delta = torch.where(is_pred, (1 - uniform) - one_minus, probs - uniform)
    elif loss == "ce_pred":  # δ = (p - e_ŷ) / T
        delta = torch.where(is_pred, -one_minus, probs)
    elif loss == "energy":  # L = T·LSE(f/T): δ = p, independent of T
        return torch.linalg.vector_norm(probs, ord=p, dim=1)
    else:  # expected_ce: δ_y = (p - e_y) / T for y ~ p
        # ‖p - e_y‖_p^p = Σ_{j≠y} p_j^p + (1 - p_y)^p; the sum over j ≠ ŷ is
        # formed directly (not as Σ_j p_j^p - p_ŷ^p, which cancels).
        powers = probs.pow(p)
        others_at_pred = powers.masked_fill(is_pred, 0).sum(dim=1, keepdim=True)
        others = torch.where(is_pred, others_at_pred, powers.sum(dim=1, keepdim=True) - powers)
        per_label = (others + one_minus.pow(p)).pow(1 / p)
        return (probs * per_label).sum(dim=1) / temperature
    return torch.linalg.vector_norm(delta, ord=p, dim=1) / temperature


def lastlayer_grad_norm(
    logits: torch.Tensor,
    features: torch.Tensor,
    loss: str,
    p: float,
    temperature: float = 1.0,
    include_bias: bool = False,
) -> torch.Tensor:
    """Raw entry-wise p-norm of a per-sample loss's gradient w.r.t. the last layer.

    For f = W v + b and δ = ∂L/∂f, ∇_W L = δ vᵀ and ∇_b L = δ, so
        ‖∇_W L‖_p = ‖δ‖_p · ‖v‖_p,   ‖[∇_W L, ∇_b L]‖_p = ‖δ‖_p · (‖v‖_p^p + 1)^(1/p)
    (docs/conventions.md, "The last-layer closed form"). Losses, with δ:
        "kl_uniform"   KL(u ‖ softmax(f/T))           (p - u) / T     (GradNorm)
        "ce_pred"      CE(f/T, ŷ)                     (p - e_ŷ) / T   (GRODIN)
        "expected_ce"  E_{y~p} of the norm for CE(f/T, y), (p - e_y) / T  (ExGrad)
        "energy"       T · log Σ_j exp(f_j / T)        p
    p is any real >= 1. Returns the norm itself, not an ID-score.
    """
    where = "gradood.reference.lastlayer_grad_norm"
    check_logits(where, logits)
    check_features(where, features, logits)
    loss = check_choice(where, "loss", loss, LOSSES)
    p = check_positive(where, "p", p)
    if p < 1:
        raise ValueError(f"{where}: p must be >= 1 (a norm), got {p!r}")
    temperature = check_temperature(where, temperature)
    return _delta_norm(logits, loss, p, temperature) * _feature_norm(features, p, include_bias)


def gradnorm(
    logits: torch.Tensor,
    features: torch.Tensor,
    temperature: float = 1.0,
    scale: str = "paper",
    include_bias: bool = False,
) -> torch.Tensor:
    """GradNorm (Huang et al. 2021): L1 norm of ∇_W KL(u ‖ softmax(f/T)).

        score = (Σ_j |p_j - 1/C| / T) · ‖v‖_1

    scale="official" multiplies by C, as the official code does (its loss is
    Σ_c -log p_c, with δ = (C p - 1) / T): same ranking. With include_bias the
    bias gradient counts too: ‖v‖_1 becomes ‖v‖_1 + 1. ID-high.
    """
    where = "gradood.reference.gradnorm"
    check_logits(where, logits)
    check_features(where, features, logits)
    scale = check_choice(where, "scale", scale, ("paper", "official"))
    temperature = check_temperature(where, temperature)
    norm = _delta_norm(logits, "kl_uniform", 1.0, temperature) * _feature_norm(features, 1.0, include_bias)
    return norm * logits.shape[1] if scale == "official" else norm


def exgrad(logits: torch.Tensor, features: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ExGrad (Igoe et al. 2022): expected L1 norm of the last-layer CE gradient
    with labels drawn from the model's own prediction, negated:

        score = -(2 / T) · Σ_j p_j (1 - p_j) · ‖v‖_1

    The norm is OOD-high, so the ID-score is its negation.
    """
    where = "gradood.reference.exgrad"
    check_logits(where, logits)
    check_features(where, features, logits)
    temperature = check_temperature(where, temperature)
    probs, one_minus, _ = _softmax(logits, temperature)
    gini = (probs * one_minus).sum(dim=1)
    return -(2 / temperature) * gini * features.abs().sum(dim=1)


def grodin_last_layer(
    logits: torch.Tensor,
    features: torch.Tensor,
    temperature: float = 1.0,
    include_bias: bool = True,
) -> torch.Tensor:
    """GRODIN's last-layer term
    ("GRODIN: Improved Large-Scale Out-of-Domain Detection via Back-propagation" (anonymous, ICLR 2022 submission, OpenReview)): L2 norm of the gradient of
    CE(f/T, ŷ) w.r.t. the last layer (weight and, by default, bias), negated:

        score = -(‖p - e_ŷ‖_2 / T) · sqrt(‖v‖_2² + 1)      (bias included)
        score = -(‖p - e_ŷ‖_2 / T) · ‖v‖_2                 (include_bias=False)

    with ‖p - e_ŷ‖_2² = (1 - p_ŷ)² + Σ_{j≠ŷ} p_j². OOD-high norm, negated.
    """
    where = "gradood.reference.grodin_last_layer"
    check_logits(where, logits)
    check_features(where, features, logits)
    temperature = check_temperature(where, temperature)
    return -_delta_norm(logits, "ce_pred", 2.0, temperature) * _feature_norm(features, 2.0, include_bias)


def rg(logits: torch.Tensor, features: torch.Tensor, clip: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """RG, Reactivate GradNorm, multiplicative
    ("RG: Out-of-Distribution Detection with Reactivate GradNorm" (anonymous, under review, OpenReview), eq. 8):

        score = T · log Σ_j exp(f_j / T) · Σ_i min(|v_i|, k)

    with the model's own logits (not recomputed from clipped features: that is
    ReAct). k = clip. ID-high.
    """
    where = "gradood.reference.rg"
    check_logits(where, logits)
    check_features(where, features, logits)
    clip = check_positive(where, "clip", clip, allow_inf=True)
    temperature = check_temperature(where, temperature)
    return _energy(logits, temperature) * _clipped_l1(features, clip)


def rg_additive(logits: torch.Tensor, features: torch.Tensor, clip: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """RG, additive variant
    ("RG: Out-of-Distribution Detection with Reactivate GradNorm" (anonymous, under review, OpenReview), eq. 12):

        score = log Σ_j exp(f_j) + α · Σ_i min(|v_i|, k)

    α = a · α_s with α_s = std_ID[log Σ exp f] / std_ID[Σ min(v_i, k)] (fitted by
    the detector; a = 0.6 was best in the paper). k = clip. ID-high.
    """
    where = "gradood.reference.rg_additive"
    check_logits(where, logits)
    check_features(where, features, logits)
    clip = check_positive(where, "clip", clip, allow_inf=True)
    alpha = check_real(where, "alpha", alpha)
    return torch.logsumexp(logits, dim=1) + alpha * _clipped_l1(features, clip)


def uv(
    logits: torch.Tensor,
    features: torch.Tensor,
    u: str = "energy",
    v: str = "l1",
    clip: Optional[float] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The U·V family (Igoe et al. 2022): an output-space term times a feature norm.

        U: "msp"       max_j p_j
           "energy"    T · log Σ_j exp(f_j / T)
           "max_logit" max_j f_j
           "gradnorm"  Σ_j |p_j - 1/C| / T
           "exgrad"    -(2 / T) Σ_j p_j (1 - p_j)   (negated: ExGrad's U is OOD-high)
        V: "l1" ‖v‖_1, "l2" ‖v‖_2, "clipped_l1" Σ_i min(|v_i|, clip) (clip required)

    score = U · V; u="energy", v="l1" is the best member in the RG paper's
    table ("Conor Igoe" row). ID-high.
    """
    where = "gradood.reference.uv"
    check_logits(where, logits)
    check_features(where, features, logits)
    u = check_choice(where, "u", u, U_TERMS)
    v = check_choice(where, "v", v, V_TERMS)
    clip = check_optional_clip(where, clip, needed=v == "clipped_l1")
    temperature = check_temperature(where, temperature)
    if u == "msp":
        output_term = _probabilities(logits, temperature).amax(dim=1)
    elif u == "energy":
        output_term = _energy(logits, temperature)
    elif u == "max_logit":
        output_term = logits.amax(dim=1)
    elif u == "gradnorm":
        output_term = _delta_norm(logits, "kl_uniform", 1.0, temperature)
    else:
        probs, one_minus, _ = _softmax(logits, temperature)
        output_term = -(2 / temperature) * (probs * one_minus).sum(dim=1)
    if v == "l1":
        feature_term = features.abs().sum(dim=1)
    elif v == "l2":
        feature_term = torch.linalg.vector_norm(features, ord=2, dim=1)
    else:
        assert clip is not None
        feature_term = _clipped_l1(features, clip)
    return output_term * feature_term


def _check_react_inputs(
    where: str,
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    clip: float,
) -> float:
    """Validates ReAct's inputs (shared with gradood.scores.react); returns clip."""
    check_matrix(where, "features", features, "[B, D]")
    check_matrix(where, "weight", weight, "[C, D]")
    if weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"{where}: weight must be [C, {features.shape[1]}] to match features [B, D], "
            f"got shape {tuple(weight.shape)}"
        )
    check_same_dtype_device(where, "weight", weight, features, "features")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"{where}: bias must be a tensor of shape [{weight.shape[0]}] or None, got {shape}")
        check_same_dtype_device(where, "bias", bias, features, "features")
    return check_positive(where, "clip", clip, allow_inf=True)


def react(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    clip: float,
) -> torch.Tensor:
    """ReAct (Sun et al. 2021): energy of the logits recomputed from clipped features,

        score = log Σ_j exp((W min(v, c) + b)_j)

    c = clip, usually the 90th percentile of ID activations. Only the upper
    side is clipped, as in the paper. ID-high.
    """
    clip = _check_react_inputs("gradood.reference.react", features, weight, bias, clip)
    logits = F.linear(features.clamp_max(clip), weight, bias)
    return torch.logsumexp(logits, dim=1)


def kl_matching(logits: torch.Tensor, templates: torch.Tensor, mode: str = "min") -> torch.Tensor:
    """KL matching (Hendrycks et al. 2022), negated:

        score = -min_k KL(p ‖ d_k)          (mode="min", as OpenOOD)
        score = -KL(p ‖ d_ŷ)                (mode="predicted", as pytorch-ood)

    p = softmax(f), d_k = templates[k] the mean softmax of ID validation
    samples predicted as class k ([K, C]; K = C for mode="predicted").
    KL(p ‖ d) = Σ_j p_j (log p_j - log d_j), with 0 · log(0/d) = 0 and p · log(p/0) =
    +inf for p > 0 (template entries underflow to 0 where the fit samples' softmax
    saturates). A class that no fit sample was
    predicted as has no template (a NaN row): it takes no part in the minimum,
    and under mode="predicted" a sample predicted as it scores −inf (no evidence
    that it is in-distribution). Computed in float32 (float64 for float64 inputs).
    The divergence is OOD-high, so the ID-score is its negation.
    """
    where = "gradood.reference.kl_matching"
    check_logits(where, logits)
    check_matrix(where, "templates", templates, "[K, C]")
    mode = check_choice(where, "mode", mode, ("min", "predicted"))
    num_classes = logits.shape[1]
    if templates.shape[1] != num_classes:
        raise ValueError(
            f"{where}: templates must be [K, {num_classes}] to match logits [B, C], got shape {tuple(templates.shape)}"
        )
    if mode == "predicted" and templates.shape[0] != num_classes:
        raise ValueError(
            f"{where}: mode='predicted' needs one template per class, [{num_classes}, {num_classes}], "
            f"got shape {tuple(templates.shape)}"
        )
    if templates.device != logits.device:
        raise ValueError(
            f"{where}: templates must be on the device of logits ({logits.device}), got {templates.device}"
        )
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(compute)
    missing = templates.isnan().any(dim=1)
    if bool(missing.all()):
        raise ValueError(f"{where}: every template is missing (NaN): fit on data the model predicts some class for")
    log_probs = torch.log_softmax(logits, dim=1)
    probs = log_probs.exp()
    # KL(p ‖ d_k) = Σ_j p_j log p_j - Σ_j p_j log d_k,j   -> [B, K]
    neg_entropy = torch.xlogy(probs, probs).sum(dim=1, keepdim=True)
    templates = templates.masked_fill(missing[:, None], 1.0)
    # Logs taken in the templates' own precision (float64 from fit: an entry of 1e-53 has a finite
    # log, which a cast to float32 first would turn into log 0). 0 · log 0 = 0: an entry that is 0
    # only counts where p_j > 0, and then the divergence is +inf (not the GEMM's 0 · (-inf) = NaN).
    zero = templates == 0
    log_templates = torch.where(zero, torch.zeros_like(templates), templates.log()).to(compute)
    divergences = neg_entropy - probs @ log_templates.T
    if bool(zero.any()):
        divergences = divergences.masked_fill((probs > 0).to(compute) @ zero.to(compute).T > 0, float("inf"))
    divergences = divergences.masked_fill(missing[None, :], float("inf"))
    if mode == "min":
        return -divergences.amin(dim=1)
    return -divergences.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
