"""ASH, activation shaping ("Extremely Simple Activation Shaping for Out-of-Distribution
Detection", Djurisic, Bozanic, Ashok & Liu, ICLR 2023, arXiv:2209.09858): the penultimate
features v [B, D] of each sample keep their k = D − round(D · p / 100) largest entries
(the rest set to 0), are reshaped by the variant, and go through the head again; the score
is the energy of those logits (ID-high):

    ASH-P:  v' = prune(v)
    ASH-B:  v' = (s₁ / k) · 1[kept]                     s₁ = Σ_i v_i
    ASH-S:  v' = prune(v) · exp(s₁ / s₂)                 s₂ = Σ_i prune(v)_i
    score = log Σ_j exp((W v' + b)_j)

with p = 90 by default (the paper's ImageNet setting; pytorch-ood's default is 65).

Exactly as the paper's code where its answer is defined, and deterministic where it is
not: the kept entries are those above the k-th largest value plus, among entries equal to
it, the lowest-indexed ones (torch.topk picks among ties arbitrarily, which changes ASH-B's
logits when zeros tie at the threshold), so the score of a sample does not depend on its
batch. The sums are torch's (cascaded, in the features' precision), their ratio in float64; the energy is the fused kernel's, in float64 for rows
whose scale exp(s₁/s₂) exceeds 1e30 (s₁/s₂ <= D/k for non-negative features: up to e^100
at p = 99), so the scale does not overflow float32; a score itself beyond float32's range
(s₁/s₂ above ~88, p above ~99.8 on wide features) is +inf in float32 output: pass float64
features there. Features or a head whose products overflow float32 overflow the same way. A row whose kept entries are all 0 has logits b (any scale
gives them); s₂ = 0 with non-zero kept entries (signed features) is undefined and gives
NaN, as does a NaN feature. The features are post-ReLU in the paper. One forward, no fit.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from gradood import scores
from gradood._checks import check_matrix
from gradood._ops import cpu_capability, pruned_linear_blocks
from gradood.detectors._base import Detector
from gradood.detectors._head import HeadName, derived_from_weight
from gradood.model_io import LogitsFn

VARIANTS = ("s", "b", "p")


def kept_mask(features: torch.Tensor, keep: int) -> torch.Tensor:
    """bool [B, D]: each row's `keep` largest entries, ties at the threshold broken by the
    lower index (deterministic, batch-invariant)."""
    return _kept(features, keep)[0]


def _kept(features: torch.Tensor, keep: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kept_mask, each row's threshold: its keep-th largest value [B, 1])."""
    count = features.shape[1]
    threshold = features.kthvalue(count - keep + 1, dim=1, keepdim=True).values
    mask = features >= threshold
    crowded = (mask.sum(1) != keep).nonzero().squeeze(1)  # rows with more ties at the threshold than room
    if crowded.numel():
        rows, limit = features[crowded], threshold[crowded]
        above = rows > limit
        ties = rows == limit
        room = keep - above.sum(1, keepdim=True)
        mask[crowded] = above | (ties & (ties.cumsum(1, dtype=torch.int32) <= room))
    return mask, threshold


def ash_energy(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    variant: str = "s",
    percentile: float = 90.0,
) -> torch.Tensor:
    """ASH's ID-score [B] (float64 for float64 features, else float32) of penultimate
    features [B, D] and a head (W [C, D], b [C] or None); see the module docstring."""
    if variant not in VARIANTS:
        raise ValueError(f"gradood.detectors.ash: variant must be one of {VARIANTS}, got {variant!r}")
    return shaped_energy(features, weight, bias, variant, percentile, "gradood.detectors.ash")


def shaped_energy(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    shaping: str,
    percentile: float,
    where: str,
    blocks: Optional[torch.Tensor] = None,
    head_products: Optional[torch.Tensor] = None,
    transposed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The energy of the head on shaped features: ASH's variants ("s", "b", "p") and SCALE's
    ("scale": every feature, unpruned, times ASH-S's exp(s₁/s₂); `head_products`, W v [B, C]
    in the accumulation dtype, spares its GEMM when the caller has it)."""
    check_matrix(where, "features", features, "[B, D]")
    if weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"{where}: the head's weight must be [C, D] with D = {features.shape[1]} (the features'), "
            f"got shape {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{where}: the head's bias must be [C] with C = {weight.shape[0]}, got shape {tuple(bias.shape)}"
        )
    keep = _kept_count(features.shape[1], _check_percentile(where, percentile), where)
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    v = features.to(acc)
    # The CPU operators have no derivatives: features that require a gradient take the ATen ops.
    differentiated = torch.is_grad_enabled() and v.requires_grad
    if v.device.type == "cpu" and not torch.compiler.is_compiling() and not differentiated:
        products, scale = _shaped_products_cpu(v, weight, shaping, keep, blocks, head_products, transposed)
    else:
        products, scale = _shaped_products(v, weight, shaping, keep, head_products)
    score = _energy(scale.to(acc)[:, None] * products, bias, acc)
    large = scale > _SAFE_SCALE  # exp(s₁/s₂) may overflow in `acc`: those rows in float64
    if acc != torch.float64 and bool(large.any()):
        rows = large.nonzero().squeeze(1)
        score[rows] = _energy(scale[rows, None] * products[rows].double(), bias, torch.float64).to(acc)
    return torch.where(features.isnan().any(1), torch.full_like(score, math.nan), score)


def _scale_of(total: torch.Tensor, kept_sum: torch.Tensor, nothing_kept: torch.Tensor) -> torch.Tensor:
    """ASH-S's and SCALE's exp(s₁/s₂) in float64; 1 where every kept entry is 0 (then the shaped
    row is 0, or for SCALE an all-zero row), NaN where s₂ = 0 otherwise."""
    ratio = torch.where(kept_sum != 0, total / kept_sum, torch.full_like(total, math.nan))
    return torch.where(nothing_kept, torch.ones_like(total), ratio.exp())


def _shaped_products_cpu(
    v: torch.Tensor,
    weight: torch.Tensor,
    shaping: str,
    keep: int,
    blocks: Optional[torch.Tensor],
    head_products: Optional[torch.Tensor] = None,
    transposed: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(W v' [B, C] before the scale, the scale [B] in float64) by gradood::top_features (one
    selection pass per row, s₁ and s₂ in float64) and gradood::pruned_linear (K = keep products
    per logit instead of D; `blocks` is the head's blocked Wᵀ, built here when not given) or, given
    `transposed` (Wᵀ [D, C] contiguous), torch's sparse CSR product of the kept entries."""
    values, indices, total, kept_sum = torch.ops.gradood.top_features(v, keep)
    classes = weight.shape[0]
    if shaping == "scale":
        scale = _scale_of(total, kept_sum, (v == 0).all(1))
        return (v @ weight.to(v.dtype).T if head_products is None else head_products), scale
    if shaping == "b":  # (s₁ / k) on every kept entry
        values = (total / keep).to(v.dtype)[:, None].expand(-1, keep)
    # K products per logit pay where K is well below D (a dense GEMM does 2-3x the flops per
    # second): on the AVX2/AVX-512 kernel where the blocked Wᵀ is cached or a large batch
    # amortises building it; by torch's sparse CSR product (MKL's where torch has it) against a
    # cached contiguous Wᵀ at the other levels, where the SSE2 kernel is slower than MKL's.
    # AVX2 EPYC, B = 64, C = 1000, D = 2048, K = 205: dense 2.9 ms, CSR 1.2, pruned_linear 0.48;
    # DEFAULT: 3.1, 0.6, 1.2 (benchmarks/RESULTS.md).
    few = 4 * keep <= v.shape[1]
    if few and (blocks is not None or v.shape[0] >= 256) and cpu_capability() in ("AVX2", "AVX512"):
        table = pruned_linear_blocks(weight.to(v.dtype)) if blocks is None else blocks
        products = torch.ops.gradood.pruned_linear(values, indices, table, classes)
    elif few and transposed is not None:
        batch, count = v.shape
        rows = torch.arange(0, batch * keep + 1, keep, dtype=torch.int64)
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            pruned = torch.sparse_csr_tensor(rows, indices.reshape(-1), values.reshape(-1), size=(batch, count))
        products = pruned @ transposed
    else:
        shaped = torch.zeros_like(v).scatter_(1, indices, values)
        products = shaped @ weight.to(v.dtype).T
    if shaping == "s":
        return products, _scale_of(total, kept_sum, (values == 0).all(1))
    return products, torch.ones_like(total)


def _shaped_products(
    v: torch.Tensor, weight: torch.Tensor, shaping: str, keep: int, head_products: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same from ATen ops (other devices, torch.compile): the kept mask, sums in the
    features' precision, a dense GEMM."""
    mask, threshold = _kept(v, keep)
    total = v.sum(1).double()  # s₁ (torch's cascade sum; a float64 sum would copy v first)
    scale = torch.ones_like(total)
    if shaping == "b":
        shaped = mask.to(v.dtype) * (total / keep).to(v.dtype)[:, None]
    else:
        pruned = v * mask
        shaped = v if shaping == "scale" else pruned
        if shaping in ("s", "scale"):
            kept_sum = pruned.sum(1).double()  # s₂
            # every kept entry 0: they lie in [threshold, max], so max = threshold = 0; then the
            # shaped row is 0 (ASH-S), or is for SCALE where the row has no other entry either
            nothing_kept = (v.amax(1) == 0) & (threshold.squeeze(1) == 0)
            if shaping == "scale":
                nothing_kept &= v.amin(1) == 0
            scale = _scale_of(total, kept_sum, nothing_kept)
    if head_products is not None and shaping == "scale":
        return head_products, scale
    return shaped @ weight.to(v.dtype).T, scale  # W v' [B, C]


# Above this ASH-S scale, scale · W v' may overflow float32 (3.4e38): float64 rows.
_SAFE_SCALE = 1e30


def _energy(products: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """log Σ_j exp(products + b) by the fused energy kernel, in `dtype`."""
    logits = products if bias is None else products + bias.to(dtype)
    return scores.energy(logits.to(dtype))


def _kept_count(count: int, percentile: float, where: str) -> int:
    keep = count - int(round(count * percentile / 100.0))
    if keep < 1:
        raise ValueError(f"{where}: percentile {percentile} keeps none of the {count} features")
    return keep


def _check_percentile(name: str, percentile: float) -> float:
    if (
        not isinstance(percentile, numbers.Real)
        or isinstance(percentile, (bool, np.bool_))
        or not math.isfinite(percentile)
        or not 0 <= percentile < 100
    ):
        raise ValueError(f"{name}: percentile must be a number in [0, 100), got {percentile!r}")
    return float(percentile)


class ASH(Detector):
    def __init__(
        self,
        model: nn.Module,
        variant: str = "s",
        percentile: float = 90.0,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        name = type(self).__name__
        if variant not in VARIANTS:
            raise ValueError(f"{name}: variant must be one of {VARIANTS} (ASH-S, ASH-B, ASH-P), got {variant!r}")
        self.variant = variant
        self.percentile = _check_percentile(name, percentile)

    def score_features(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        weight, bias = self.head_weight_bias()
        if features.device.type != "cpu" or weight.dim() != 2:
            return ash_energy(features, weight, bias, self.variant, self.percentile)
        dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        where = "gradood.detectors.ash"
        if cpu_capability() in ("AVX2", "AVX512"):
            blocks = derived_from_weight(
                self, "_blocks_cache", weight, lambda: pruned_linear_blocks(weight.to(dtype)), dtype
            )
            return shaped_energy(features, weight, bias, self.variant, self.percentile, where, blocks)
        transposed = derived_from_weight(
            self, "_transposed_cache", weight, lambda: weight.detach().to(dtype).T.contiguous(), dtype
        )
        return shaped_energy(features, weight, bias, self.variant, self.percentile, where, transposed=transposed)
