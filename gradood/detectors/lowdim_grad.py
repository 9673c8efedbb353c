"""LowDimGrad: low-dimensional gradients ("Low-Dimensional Gradient Helps Out-of-Distribution Detection", Wu et al.,
TPAMI 2024). ID-high.

Per sample, the gradient g of log Σ_j exp f_j w.r.t. the selected parameters
(all parameters by default, frozen or not), normalised G = (g − z)/σ with the ID mean z
and per-parameter std σ, projected G_low = G V onto K directions fitted on ID
data (gradood.gradient_subspace): "pca" (top-K principal directions, K = 200
by default, randomized subspace iteration with a fixed seed) or "class" (the
per-class mean normalised gradients, unit columns, K = C). Scored by KNN on
L2-normalised G_low against the ID bank (gradood.knn: minus the squared L2
distance to the k-th neighbour, k = 5), optionally ensembled with ReAct's
energy on the same forward's features:

    score = knn(G_low)                                  ensemble=False
    score = knn(G_low) + a · log Σ_j exp((W min(v, c) + b)_j)     ensemble=True

with c the `react_percentile`-th percentile of ID activations. The KNN term
lies in [−4, 0] and the energy is in logit units, so `a` sets their balance:
score_parts() returns both terms from one pass, so a sweep over `a` needs no
refit.

Cost per scored batch: one forward and one backward pass (parameters frozen,
only the input-gradient chain), then per layer the per-sample gradients of a
bounded chunk of samples and one product with the stored directions; the
per-sample gradients of the whole network are never formed. Fitting streams
over the ID data: one pass for z and σ (and the class means), `iterations`
passes for PCA (whose last pass also gives the KNN bank), and one for the bank
of the class subspace or of directions stored in a half type. The data must give the same samples on
every pass (no random augmentation); their order may change.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from gradood import model_io, scores
from gradood.detectors._base import Data, Detector, eval_mode, fitted
from gradood.detectors._head import HeadName
from gradood.detectors.rg import activation_percentile
from gradood.gradient_subspace import (
    GradientSubspace,
    class_mean_directions,
    iterate_batches,
    moments_pass,
    pca_directions,
    progress_bar,
)
from gradood.knn import METRICS, knn_score, normalise_rows
from gradood.model_io import Inputs, LogitsFn
from gradood.persample import _verify
from gradood.persample.engine import ParamSelector, PerSampleGradients, _select, persample_gradients

SUBSPACES = ("pca", "class")


class LowDimGrad(Detector):
    fitted = ("subspace", "bank", "clip")

    def __init__(
        self,
        model: nn.Module,
        subspace: str = "pca",
        dim: Optional[int] = None,
        neighbours: int = 5,
        metric: str = "squared_l2",
        ensemble: bool = False,
        a: float = 1.0,
        react_percentile: float = 90.0,
        params: ParamSelector = None,
        functional_params: Optional[str] = None,
        fallback: Optional[str] = None,
        classes: str = "labels",
        oversample: int = 10,
        iterations: int = 6,
        seed: int = 0,
        dtype: Optional[torch.dtype] = None,
        max_samples: Optional[int] = None,
        progress: bool = False,
        verify: Union[bool, int] = True,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        _verify.call_check_count(type(self).__name__, verify)  # a bad value fails here, not at score time
        self.verify = verify
        name = type(self).__name__
        if subspace not in SUBSPACES:
            raise ValueError(f"{name}: subspace must be one of {SUBSPACES}, got {subspace!r}")
        if subspace == "class" and dim is not None:
            raise ValueError(f"{name}: subspace='class' has one direction per class; leave dim unset")
        for argument, value, low in (
            ("dim", dim, 1),
            ("neighbours", neighbours, 1),
            ("oversample", oversample, 0),
            ("iterations", iterations, 1),
            ("max_samples", max_samples, 1),
        ):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"{name}: {argument} must be an integer ≥ {low}, got {value!r}")
        if metric not in METRICS:
            raise ValueError(f"{name}: metric must be one of {METRICS}, got {metric!r}")
        if classes not in ("labels", "predicted"):
            raise ValueError(f"{name}: classes must be 'labels' or 'predicted', got {classes!r}")
        if dtype not in (None, torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise ValueError(f"{name}: dtype (the storage of the directions) must be a float dtype, got {dtype}")
        if not 0 < react_percentile <= 100:
            raise ValueError(f"{name}: react_percentile must lie in (0, 100], got {react_percentile!r}")
        self.subspace_kind, self.dim = subspace, (200 if dim is None and subspace == "pca" else dim)
        self.neighbours, self.metric, self.ensemble, self.a = neighbours, metric, ensemble, float(a)
        self.react_percentile = react_percentile
        self.params, self.functional_params, self.fallback = params, functional_params, fallback
        self.classes, self.oversample, self.iterations, self.seed = classes, oversample, iterations, seed
        self.dtype, self.max_samples, self.progress = dtype, max_samples, progress
        self.subspace: Optional[GradientSubspace] = None
        self.bank: Optional[torch.Tensor] = None
        self.clip: Optional[float] = None
        #: After fit: samples used, subspace dimension and, for PCA, the covariance eigenvalues of
        #: the K directions and how much the last iteration changed them: subspace_change (sine of
        #: the largest principal angle; dominated by the last directions when the spectrum is flat
        #: there) and eigenvalue_change (largest relative change). Raise `iterations` if too large.
        self.fit_info: Dict[str, Any] = {}

    # -- per-sample gradients --------------------------------------------------------

    def _device(self) -> torch.device:
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def _gradients(self, inputs: Inputs, features: Optional[List[torch.Tensor]] = None) -> PerSampleGradients:
        """Per-sample gradients of log Σ exp f (and, when asked, the head's input
        features, appended to `features`)."""
        capture: tuple = ()
        if features is not None:
            if self._head is None:  # found by one plain forward
                self.forward_features(inputs)
            capture = fitted(self._head, "the head").names
        with eval_mode(self.model):
            grads = persample_gradients(
                self.model,
                model_io.to_device(inputs, self._device()),
                "logsumexp",
                params=self.params,
                functional_params=self.functional_params,
                fallback=self.fallback,
                logits=self.logits_fn,
                verify=self.verify,
                capture=capture,
            )
        if features is not None:
            features.append(self.head_features(grads.captured, grads.logits))
        return grads

    def low_dimensional_gradients(self, inputs: Inputs) -> torch.Tensor:
        """G_low [B, K] of a batch (before the L2 normalisation of the KNN score)."""
        self._require_fitted()
        return fitted(self.subspace).project(self._gradients(inputs))

    # -- fitting ------------------------------------------------------------------------

    def _passes(self, id_data: Data):
        """A function starting one pass over the fit data: (inputs on the model's device, labels)."""
        device = self._device()

        def batches() -> Iterable:
            for inputs, labels in iterate_batches(id_data, self.max_samples):
                yield model_io.to_device(inputs, device), labels

        return batches

    def fit(self, id_data: Data) -> LowDimGrad:
        """Fits z, σ, the subspace, the KNN bank (every fit sample) and ReAct's clip
        on ID data: a tensor, an (inputs, labels) pair, or a re-iterable of batches
        (a DataLoader; not a one-shot iterator). Labels are needed for
        subspace='class' with classes='labels'."""
        name = type(self).__name__
        if not isinstance(id_data, (torch.Tensor, tuple, list)) and iter(id_data) is id_data:
            raise TypeError(
                f"{name}.fit: id_data is a one-shot iterator, but fitting makes several passes; "
                "pass a DataLoader, a list of batches or a tensor"
            )
        passes = self._passes(id_data)
        if self.ensemble:  # ReAct needs the linear head, found on one batch; the KNN term does not
            first = next(iter(passes()), None)
            if first is not None:
                self.forward_features(first[0])

        features: List[torch.Tensor] = []
        report = progress_bar(self.progress, f"{name}.fit: gradient moments")
        try:
            moments, class_sums, class_counts = moments_pass(
                lambda inputs: self._gradients(inputs, features if self.ensemble else None),
                passes(),
                self.classes if self.subspace_kind == "class" else None,
                progress=report,
            )
        except ValueError as error:
            raise ValueError(f"{name}.fit: {error}") from None
        finally:
            report.close()
        if self.subspace_kind == "pca":
            dim = fitted(self.dim, "dim")  # set for subspace="pca" (the constructor checks it)
            total = sum(m.numel() for m in moments.mean.values())
            if dim > total:
                raise ValueError(f"{name}.fit: dim={self.dim} exceeds the {total} selected parameters")
            if moments.samples <= dim:
                raise ValueError(
                    f"{name}.fit: PCA with dim={self.dim} needs more than {self.dim} ID samples, got {moments.samples}"
                )
            fit = pca_directions(
                self._gradients,
                passes,
                moments,
                dim,
                self.oversample,
                self.iterations,
                self.seed,
                self._device(),
                self.progress,
            )
        else:
            try:
                fit = class_mean_directions(moments, fitted(class_sums), fitted(class_counts))
            except ValueError as error:
                raise ValueError(f"{name}.fit: {error}") from None
        shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters() if n in moments.mean}
        storage = self.dtype or moments.dtype  # default: the computation's
        self.subspace = GradientSubspace.from_directions(moments, fit, shapes, storage)

        if fit.projections is not None and storage == fit.projections.dtype:
            # PCA: the last iteration's X Z times the Ritz vectors is G_low of every fit sample.
            self.bank = normalise_rows(fit.projections)
        else:  # per-class directions, or directions stored in a half type: project with what is stored
            rows = []
            report = progress_bar(self.progress, f"{name}.fit: ID bank")
            for inputs, _ in passes():
                rows.append(normalise_rows(self.subspace.project(self._gradients(inputs))))
                report.update(model_io.batch_size(inputs))
            report.close()
            self.bank = torch.cat(rows)
        if self.bank.shape[0] < self.neighbours:
            self.subspace = self.bank = None
            raise ValueError(
                f"{name}.fit: neighbours={self.neighbours} needs at least that many fit samples, got "
                f"{moments.samples}; lower neighbours or fit on more data"
            )
        if self.ensemble:
            self.clip = activation_percentile(
                torch.cat(features), self.react_percentile, f"{type(self).__name__}.fit (react_percentile)"
            )
        self.fit_info = {
            "samples": moments.samples,
            "dim": self.subspace.dim,
            "subspace_change": fit.change,
            "eigenvalue_change": fit.eigenvalue_change,
            "eigenvalues": fit.eigenvalues,
        }
        return self

    # -- scoring ------------------------------------------------------------------------

    def score_parts(self, inputs: Inputs) -> Dict[str, torch.Tensor]:
        """Both terms from one pass: {"knn": [B]} and, when fitted with ensemble=True,
        {"react_energy": [B]}; score = knn + a · react_energy. A sweep over `a` needs
        these once, not a refit per value."""
        self._require_fitted()
        features: List[torch.Tensor] = []
        grads = self._gradients(inputs, features if self.clip is not None else None)
        low = fitted(self.subspace).project(grads)
        parts = {"knn": knn_score(low, fitted(self.bank).to(low.device), self.neighbours, self.metric)}
        if self.clip is not None:
            weight, bias = self.head_weight_bias()
            v = features[0]
            energy = scores.react(v, weight.to(v.dtype), None if bias is None else bias.to(v.dtype), self.clip)
            parts["react_energy"] = energy.to(parts["knn"].dtype)
        return parts

    def score(self, inputs: Inputs) -> torch.Tensor:
        if self.ensemble and self.clip is None and self.subspace is not None:
            raise RuntimeError(f"{type(self).__name__}: fitted without ensemble; refit to use ensemble=True")
        parts = self.score_parts(inputs)
        return parts["knn"] + self.a * parts["react_energy"] if self.ensemble else parts["knn"]

    def score_features(self, logits, features):
        raise NotImplementedError(f"{type(self).__name__} needs the per-sample gradients: use score(inputs)")

    # -- state ----------------------------------------------------------------------------

    def _require_fitted(self) -> None:
        if self.subspace is None or self.bank is None:
            raise RuntimeError(f"{type(self).__name__}: call fit(id_data) first")

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["subspace"] = None if self.subspace is None else self.subspace.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> LowDimGrad:
        saved = (state.get("subspace") or {}).get("shapes")
        if saved is not None:  # the directions must be over the parameters this detector selects, shape for shape
            selected = {
                name: tuple(p.shape) for name, p in _select(self.model, self.params, type(self).__name__).items()
            }
            saved = {name: tuple(shape) for name, shape in saved.items()}
            if saved != selected:
                differ = sorted(set(saved) ^ set(selected)) or sorted(n for n in saved if saved[n] != selected[n])
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the state's subspace is over other parameters than this "
                    f"detector's params selection on its model (differing: {differ[:5]}{' ...' if len(differ) > 5 else ''}); "
                    "construct the detector with the params (and model) it was fitted with, or fit it again"
                )
        super().load_state_dict(state)
        if state["subspace"] is not None:
            self.subspace = GradientSubspace.from_state_dict(state["subspace"])
        return self

    def to(self, device) -> LowDimGrad:
        if self.subspace is not None:
            self.subspace = self.subspace.to(device)
        if self.bank is not None:
            self.bank = self.bank.to(device)
        return self
