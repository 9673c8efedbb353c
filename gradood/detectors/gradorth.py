"""GradOrth, the last-layer gradient projected on the ID feature subspace ("GradOrth: A Simple yet
Efficient Out-of-Distribution Detection with Orthogonal Projection of Gradients", Behpour, Doan,
Li, He, Gou & Ren, NeurIPS 2023, arXiv:2308.00310): the norm of the head's gradient after
projecting its input side on the span S of the ID features' principal directions (ID-high: a
gradient with little weight in the ID subspace is OOD):

    ∇_W KL(u ‖ softmax(f / T)) = (p − u) vᵀ / T,        p = softmax(f / T), u = 1/C
    score = ‖(p − u) (S Sᵀ v)ᵀ‖_F = ‖p − u‖₂ · ‖Sᵀ v‖₂   (the 1/T dropped, as GradNorm's)

S [D, k]: the top-k right singular vectors of the ID representation matrix R = [v_1 … v_N]ᵀ
(uncentred, as Gradient Projection Memory's, on which the method builds), k the smallest rank
whose singular values hold `threshold` of ‖R‖²_F (default 0.97, GPM's ε_th; `dim` fixes k
instead). The loss is GradNorm's KL to the uniform distribution. No official code was found:
this is the method as its paper and GPM define it, the closed form of the projected gradient
(the gradient is rank one) in place of a backward pass.

Numerics: Rᵀ R streamed over the fit data in float64 (memory D², whatever N) and its
eigendecomposition (the singular values squared); a fit is refused where the k-th and (k + 1)-th
eigenvalues are equal to round-off (the subspace is then not determined). ‖p − u‖₂ from a float64
softmax; Sᵀ v by one GEMM in the features' precision (float32: ~1e-7 of ‖v‖ absolute), its norm
in float64. NaN logits or features score NaN. One forward plus a B × D × k GEMM."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gradood._checks import check_counts, check_features, check_positive
from gradood.detectors._base import Data, Detector, fitted
from gradood.detectors._head import HeadName
from gradood.model_io import LogitsFn


class GradOrth(Detector):
    fitted = ("basis",)

    def __init__(
        self,
        model: nn.Module,
        threshold: float = 0.97,
        dim: Optional[int] = None,
        temperature: float = 1.0,
        max_samples: Optional[int] = None,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        name = type(self).__name__
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"{name}: threshold must be in (0, 1], got {threshold!r}")
        check_counts(name, dim=dim, max_samples=max_samples)
        self.threshold, self.dim, self.max_samples = float(threshold), dim, max_samples
        self.temperature = check_positive(name, "temperature", temperature)
        self.basis: Optional[torch.Tensor] = None  # S [D, k], float64

    def fit(self, id_data: Data) -> GradOrth:
        name = f"{type(self).__name__}.fit"
        gram: Optional[torch.Tensor] = None
        seen = 0
        for _, features in self.first_samples(id_data, self.max_samples):
            v = features.detach().double()
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{name}: the ID features hold NaN or Inf")
            gram = v.T @ v if gram is None else gram.addmm_(v.T, v)
            seen += v.shape[0]
        if gram is None or seen == 0:
            raise ValueError(f"{name}: the data holds no sample")
        if not bool(torch.isfinite(gram).all()):
            raise ValueError(f"{name}: Rᵀ R overflows float64 (features of about 1e154 or more)")
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
        total = float(eigenvalues.sum())
        if total <= 0:
            raise ValueError(f"{name}: every ID feature is 0: there is no subspace")
        d = gram.shape[0]
        if self.dim is not None:
            if self.dim > d:
                raise ValueError(f"{name}: dim={self.dim} exceeds the {d} feature dimensions")
            k = self.dim
        else:
            held = torch.cumsum(eigenvalues, 0) / total
            k = min(int(torch.searchsorted(held, torch.tensor(self.threshold, dtype=held.dtype) * (1 - 1e-12))) + 1, d)
        tolerance = d * torch.finfo(torch.float64).eps * float(eigenvalues[0])
        if k < d and float(eigenvalues[k - 1] - eigenvalues[k]) <= tolerance:
            raise ValueError(
                f"{name}: the {k}-th and {k + 1}-th singular values of the ID features are equal to round-off "
                f"({seen} samples, {d} dimensions), so the rank-{k} subspace is not determined: pass another "
                "threshold or dim, or fit on more ID samples"
            )
        self.basis = eigenvectors[:, :k].contiguous()
        return self

    def score_features(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        self._require_fitted()
        where = f"{type(self).__name__}.score_features"
        check_features(where, features, logits)
        basis = fitted(self.basis)
        if features.shape[1] != basis.shape[0]:
            raise ValueError(
                f"{where}: the subspace has {basis.shape[0]} features, the input {features.shape[1]}: fit again"
            )
        dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        # S in the features' precision, cached for this fitted S (a refit or load replaces it)
        cache = getattr(self, "_basis_cache", None)
        if cache is None or cache[0] is not basis or cache[1].dtype != dtype or cache[1].device != features.device:
            cache = self._basis_cache = (basis, basis.to(device=features.device, dtype=dtype))
        projection = torch.linalg.vector_norm((features.to(dtype) @ cache[1]).double(), dim=1)
        p = torch.softmax(logits.double() / self.temperature, dim=1)
        deviation = torch.linalg.vector_norm(p - 1.0 / logits.shape[1], dim=1)
        return (deviation * projection).to(dtype)
