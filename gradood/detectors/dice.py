"""DICE, directed sparsification ("DICE: Leveraging Sparsification for Out-of-Distribution
Detection", Sun & Li, ECCV 2022, arXiv:2111.09805): the head's weights are kept only where
their contribution to the ID data is large, and the score is the energy of the sparsified head
(ID-high):

    u_cj = w_cj · v̄_j                   v̄ the mean ID feature
    W'_cj = w_cj if u_cj > q_p(u) else 0, q_p the p-th percentile of all C·D contributions
    score = log Σ_c exp((W' v + b)_c)

p = 90 by default (the paper's and OpenOOD's). The percentile is `np.percentile` over every
contribution, as in the official code; entries equal to it are dropped (strict >), so ties are
deterministic. The mask belongs to the head's weights at fit time: a state loaded into a model
whose head has other weights of the same shape scores with the old mask (fit again after
fine-tuning). v̄ is accumulated in float64 over the fit data in one streamed pass; the
mask is built from the head's weight at fit time and saved with the state. One forward and
the kept weights' products per batch (DICE._sparse_products picks the product by device,
batch size and level, so a sample's score agrees across batch sizes to float32 round-off, not
bit for bit; each product alone is batch-invariant). A NaN or infinite feature scores NaN."""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple, Optional, Tuple

import torch
from torch import nn

from gradood import scores
from gradood._checks import check_features
from gradood._ops import cpu_capability, pruned_linear_sample_blocks
from gradood.detectors._base import Data, Detector, fitted
from gradood.detectors._head import HeadName, derived_from_weight
from gradood.detectors.ash import _check_percentile
from gradood.detectors.rg import numpy_percentile
from gradood.model_io import LogitsFn


def contribution_percentile(contributions: torch.Tensor, percentile: float) -> float:
    """np.percentile of every contribution: numpy's position and interpolation formulas round
    differently from the textbook ones, and with the strict > that difference keeps or drops a
    whole block of tied contributions (torch.quantile also refuses inputs above 2^24 elements)."""
    return numpy_percentile(contributions, percentile)


class DICE(Detector):
    fitted = ("mean_features", "mask")

    def __init__(
        self,
        model: nn.Module,
        percentile: float = 90.0,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        self.percentile = _check_percentile(type(self).__name__, percentile)
        self.mean_features: Optional[torch.Tensor] = None  # v̄ [D], float64
        self.mask: Optional[torch.Tensor] = None  # the kept weights, bool [C, D]

    def fit(self, id_data: Data) -> DICE:
        mean = self.mean_id_features(id_data)
        weight, _ = self.head_weight_bias()
        contributions = weight.detach().double() * mean.to(weight.device)[None, :]
        threshold = contribution_percentile(contributions, self.percentile)
        self.mean_features, self.mask = mean, contributions > threshold
        return self

    def score_features(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        self._require_fitted()
        check_features(f"{type(self).__name__}.score_features", features, logits)
        weight, bias = self.head_weight_bias()
        mask = fitted(self.mask).to(weight.device)
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(
                f"{type(self).__name__}: the fitted mask is {tuple(mask.shape)} but the head's weight is "
                f"{tuple(weight.shape)}: fit again on this model"
            )
        acc = torch.float64 if features.dtype == torch.float64 else torch.float32
        v = features.to(acc)
        logits_sparse = self._sparse_products(v, weight, mask)
        if bias is not None:
            logits_sparse += bias.to(acc)
        score = scores.energy(logits_sparse)
        # A NaN or infinite feature: NaN, whichever product ran (the dense one's 0 · inf is NaN;
        # the sparse ones never touch a feature that no class keeps). v · 0 is NaN exactly there,
        # and one vectorised sum finds it (torch.isfinite(v).all(1) took 4x as long).
        return torch.where((v * 0).sum(1).isnan(), torch.full_like(score, math.nan), score)

    def _sparse_products(self, v: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """W' v [B, C] (no bias), in v's dtype. On the CPU the head's zeros are skipped: by
        gradood::pruned_linear with samples and classes swapped (each class's kept weights
        against a block of 64 samples' features, the AVX2/AVX-512 kernel, float32, B > 32) or
        by torch's sparse CSR product (MKL's where torch has it); a dense GEMM where more than a
        quarter of the weights are kept, on other devices, under torch.compile and where the
        features require a gradient (the dense product is the differentiable one).
        AVX2 EPYC, C = 1000, D = 2048, p = 90: B = 64 1.6 ms dense, 0.81 CSR, 0.45 pruned_linear;
        B = 8: 0.44, 0.11, 0.44 (benchmarks/RESULTS.md)."""
        dtype = v.dtype
        differentiated = torch.is_grad_enabled() and v.requires_grad  # pruned_linear has no derivative
        if v.device.type != "cpu" or torch.compiler.is_compiling() or differentiated:
            return v @ self._derived("dense", weight, mask, dtype).T
        layout = self._derived("layout", weight, mask, dtype)
        classes, count = mask.shape
        if layout.kept > classes * count // 4:
            return v @ self._derived("dense", weight, mask, dtype).T
        if (
            dtype == torch.float32
            and v.shape[0] > 32
            and 4 * layout.longest <= count
            and layout.longest > 0
            and cpu_capability() in ("AVX2", "AVX512")
        ):
            values, indices = self._derived("padded", weight, mask, dtype)
            products = torch.ops.gradood.pruned_linear(values, indices, pruned_linear_sample_blocks(v), v.shape[0])
        else:
            products = self._derived("csr", weight, mask, dtype) @ v.T.contiguous()  # MKL: 20% faster than strided
        return products.T.contiguous()

    def _derived(self, form: str, weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> Any:
        """One form of W' in `dtype`, rebuilt only when the head's weight, the mask or the dtype
        changed (building it costs a pass over C·D, two thirds of the score at B = 64, C = 1000,
        D = 2048): "dense" [C, D]; "csr"; "padded", each class's kept weights and their feature
        indices [C, K] (K the largest count; the shorter classes padded with weight 0 at index
        D, pruned_linear_sample_blocks' zero row); "layout", the kept counts."""
        builders = {"dense": _dense, "csr": _csr, "padded": _padded, "layout": _layout}
        return derived_from_weight(
            self, f"_sparse_cache_{form}", weight, lambda: builders[form](weight, mask, dtype), mask, dtype
        )


class _Layout(NamedTuple):
    kept: int  # kept weights in all
    longest: int  # the most kept by one class


def _dense(weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.where(mask, weight.detach().to(dtype), torch.zeros((), dtype=dtype, device=weight.device))


def _csr(weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return _dense(weight, mask, dtype).to_sparse_csr()


def _padded(weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    longest = _layout(weight, mask, dtype).longest
    # each row's kept indices first, in increasing order (a stable sort of "not kept")
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :longest]
    kept = mask.gather(1, order)
    values = torch.where(kept, weight.detach().to(dtype).gather(1, order), torch.zeros((), dtype=dtype))
    indices = torch.where(kept, order, torch.full_like(order, mask.shape[1]))
    return values.contiguous(), indices.contiguous()


def _layout(weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> _Layout:
    counts = mask.sum(1)
    return _Layout(int(counts.sum()), int(counts.max()) if counts.numel() else 0)
