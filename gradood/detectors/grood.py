"""GrOOD, gradients with respect to an OOD prototype ("GROOD: Gradient-Aware Out-of-Distribution
Detection", ElAraby, Sahoo, Pequignot, Novello & Paull, TMLR 2025, arXiv:2312.14427): the
penultimate feature v is classified by its distances to the ID class prototypes μ_c and to one
OOD prototype μ_o; the gradient of that nearest-prototype cross-entropy, at the model's predicted
class, with respect to μ_o is compared with the same gradients of the ID training samples
(ID-high: a gradient close to an ID one is in-distribution):

    s = −[‖v − μ_1‖, …, ‖v − μ_C‖, ‖v − μ_o‖],   L = −log softmax(s)_ŷ,   ŷ = argmax_j f_j
    g(x) = ∂L/∂μ_o = softmax(s)_o · (v − μ_o) / ‖v − μ_o‖            (0 where v = μ_o)
    score = −‖g(x) − g_(k)‖²,   g_(k) the k-th nearest gradient of the ID bank

The closed form holds because ŷ is never the OOD prototype: ∂s_o/∂μ_o is the unit vector from
μ_o to v and only the softmax term of L depends on μ_o (OpenOOD's autograd, one backward per
sample, gives the same vectors). μ_c is the mean feature of the fit samples labelled c
(classes="predicted": predicted c); μ_o the mean feature of OOD validation inputs given to fit as
`ood_data` (OpenOOD's default, with 100 such samples), or, without them, the mean of the class
prototypes (OpenOOD's `use_proto_mean`). The bank holds g of the fit samples the model classifies
correctly (all of them for classes="predicted"), at most max_samples of them. k = 1 as OpenOOD,
which searches an approximate faiss IndexIVFFlat (nprobe 4); gradood's search is exact.

Numerics: the distances to the prototypes from one float64 GEMM about the prototypes' mean, pairs
whose distance is below 1e-4 of the norms recomputed from the differences (the GEMM form cancels
there); ‖v − μ_o‖ from the differences; the softmax in float64. The bank and queries are the
gradients rounded to the features' precision (float32, or float64 for float64 features); their
distances are kth_squared_distance's (exact, refined in float64). A class without a fit sample has
no prototype and the fit raises, naming it; NaN features score NaN. One forward, plus B × C × D
(float64) for the distances and B × N × D for the search."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from gradood import model_io
from gradood._checks import check_choice, check_class_indices, check_counts, check_features
from gradood.detectors._base import Data, Detector, fitted
from gradood.detectors._head import HeadName
from gradood.knn import kth_squared_distance
from gradood.model_io import LogitsFn


class GrOOD(Detector):
    fitted = ("prototypes", "ood_prototype", "bank")

    def __init__(
        self,
        model: nn.Module,
        neighbours: int = 1,
        classes: str = "labels",
        max_samples: Optional[int] = None,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        name = type(self).__name__
        check_counts(name, neighbours=neighbours, max_samples=max_samples)
        self.neighbours, self.max_samples = neighbours, max_samples
        self.classes = check_choice(name, "classes", classes, ("labels", "predicted"))
        self.prototypes: Optional[torch.Tensor] = None  # μ_c [C, D], float64
        self.ood_prototype: Optional[torch.Tensor] = None  # μ_o [D], float64
        self.bank: Optional[torch.Tensor] = None  # g of the correctly classified fit samples [N, D]

    def fit(self, id_data: Data, ood_data: Optional[Data] = None) -> GrOOD:
        """Class prototypes and the gradient bank from id_data (labelled batches unless
        classes="predicted"); the OOD prototype from ood_data's mean feature if given."""
        name = f"{type(self).__name__}.fit"
        features, targets, correct, classes = self._read_fit_data(id_data)
        sums = torch.zeros(classes, features.shape[1], dtype=torch.float64, device=features.device)
        sums.index_add_(0, targets, features.double())
        counts = torch.bincount(targets, minlength=classes)
        empty = (counts == 0).nonzero().squeeze(1).tolist()
        if empty:
            shown = ", ".join(str(c) for c in empty[:10]) + (", ..." if len(empty) > 10 else "")
            raise ValueError(
                f"{name}: class(es) {shown} ({len(empty)} of {classes}) have no fit sample, so their prototype is "
                "undefined; fit on ID data covering every class"
            )
        prototypes = sums / counts[:, None]
        if ood_data is None:
            ood_prototype = prototypes.mean(0)
        else:
            ood_prototype = self.mean_id_features(ood_data, f"{name} (ood_data)")
            if ood_prototype.shape != prototypes.shape[1:]:
                raise ValueError(
                    f"{name}: ood_data gives {ood_prototype.numel()} features, id_data {features.shape[1]}"
                )
        kept = features[correct]
        if self.max_samples is not None:
            kept = kept[: self.max_samples]
        if kept.shape[0] < self.neighbours:
            what = "correctly classified fit samples" if self.classes == "labels" else "fit samples"
            raise ValueError(
                f"{name}: neighbours={self.neighbours} needs at least that many {what} for the gradient bank, "
                f"got {kept.shape[0]}"
            )
        self.prototypes, self.ood_prototype = prototypes, ood_prototype.to(prototypes.device)
        self.bank = prototype_gradients(kept, prototypes, self.ood_prototype)
        return self

    def score_features(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        self._require_fitted()
        where = f"{type(self).__name__}.score_features"
        check_features(where, features, logits)
        prototypes = fitted(self.prototypes).to(features.device)
        if features.shape[1] != prototypes.shape[1]:
            raise ValueError(
                f"{where}: the prototypes have {prototypes.shape[1]} features, the input {features.shape[1]}: fit again"
            )
        bank = fitted(self.bank).to(features.device)
        g = prototype_gradients(features, prototypes, fitted(self.ood_prototype).to(features.device))
        return -kth_squared_distance(g.to(bank.dtype), bank, self.neighbours)

    def _read_fit_data(self, id_data: Data):
        """Every fit sample's features [N, D], class [N], whether the model gets it right [N], and
        the number of classes."""
        name = f"{type(self).__name__}.fit"
        rows: List[torch.Tensor] = []
        targets: List[torch.Tensor] = []
        correct: List[torch.Tensor] = []
        classes = None
        for inputs, labels in model_io.iterate(id_data):
            logits, features = self.forward_features(inputs)
            classes = logits.shape[1] if classes is None else classes
            if logits.shape[1] != classes:
                raise ValueError(f"{name}: the batches' logits change shape")
            predicted = logits.argmax(1)
            if self.classes == "predicted":
                target = predicted
            elif labels is None:
                raise ValueError(
                    f"{name}: the fit data give no labels: pass batches of (inputs, labels), or "
                    "classes='predicted' (every fit sample as its predicted class)"
                )
            else:
                check_class_indices(name, "labels", labels, classes)
                target = labels.reshape(-1).to(logits.device).long()
                if target.shape[0] != logits.shape[0]:
                    raise ValueError(
                        f"{name}: one label per sample expected, got {target.shape[0]} for {logits.shape[0]}"
                    )
            rows.append(features.detach().to(torch.float64 if features.dtype == torch.float64 else torch.float32))
            targets.append(target)
            correct.append(predicted == target)
        if not rows or sum(r.shape[0] for r in rows) == 0:
            raise ValueError(f"{name}: the data holds no sample")
        features = torch.cat(rows)
        if not bool(torch.isfinite(features).all()):
            raise ValueError(f"{name}: the ID features hold NaN or Inf")
        return features, torch.cat(targets), torch.cat(correct), int(classes or 0)


def prototype_gradients(features: torch.Tensor, prototypes: torch.Tensor, ood_prototype: torch.Tensor) -> torch.Tensor:
    """g = softmax(s)_o · (v − μ_o) / ‖v − μ_o‖ for each row v of features [B, D] (the module's
    formula), in the features' precision (float32, or float64 for float64 features)."""
    out_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    centre = prototypes.mean(0)
    v64 = features.double()
    v = v64 - centre
    mu = prototypes - centre
    v_squares, mu_squares = v.square().sum(1), mu.square().sum(1)
    squares = torch.addmm(v_squares[:, None] + mu_squares[None, :], v, mu.T, alpha=-2).clamp_min_(0)
    close = squares < 1e-8 * (v_squares[:, None] + mu_squares[None, :])  # distance < 1e-4 of the norms
    if bool(close.any()):
        r, c = close.nonzero(as_tuple=True)
        squares[r, c] = (v[r] - mu[c]).square().sum(1)
    towards = v64 - ood_prototype  # v − μ_o
    ood_distance = torch.linalg.vector_norm(towards, dim=1)
    s = torch.cat([squares.sqrt_(), ood_distance[:, None]], 1).neg_()
    p_ood = torch.softmax(s, dim=1)[:, -1]
    scale = torch.where(ood_distance > 0, p_ood / ood_distance, torch.zeros_like(p_ood))
    # NaN features: their distances, p_o and so g are NaN (the where keeps NaN: NaN > 0 is False
    # but p_o is NaN too, so the row is NaN through `towards`).
    scale = torch.where(torch.isnan(ood_distance), ood_distance, scale)
    return (towards * scale[:, None]).to(out_dtype)
