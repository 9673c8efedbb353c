"""LowDimGrad: low-dimensional gradients ("Low-Dimensional Gradient Helps Out-of-Distribution Detection", Wu et al.,
TPAMI 2024). ID-high.

Per sample, the gradient g of log Σ_j exp f_j w.r.t. the selected parameters
(all parameters by default, frozen or not), normalised G = (g − z)/σ with the ID mean z
and per-parameter std σ, projected G_low = G V onto K directions fitted on ID
data (gradood.gradient_subspace): "pca" (top-K principal directions, K = 200
by default, randomized subspace iteration with a fixed seed) or "class" (the
per-class mean normalised gradients, unit columns, K = C). G_low is scored by
one base score (gradood.detectors.lowdim_scores):

    score="knn"          −‖ĝ − b̂_(k)‖², ĝ = G_low/‖G_low‖, to the k-th nearest normalised ID row (k = 5)
    score="mahalanobis"  −min_c (ĝ − μ_c)ᵀ Σ⁺ (ĝ − μ_c), class means, shared covariance
                         (Σ⁺: pseudo-inverse, as the paper's scikit-learn fit; with subspace="class" the
                         directions sum to zero over the ID set, so Σ is singular by construction)
    score="msp" | "energy" | "odin" | "gradnorm" | "react" | "bats"
                         the forward score of a linear probe BatchNorm1d(K) → Linear(K, C)
                         trained on the ID ĝ (ODIN's step taken on ĝ, ReAct clipping its
                         coordinates from clip_start on, BATS truncating the BatchNorm output)

with ĝ the L2-normalised G_low as KNN uses it (normalise=False: the raw G_low; OOD
gradients are several times larger than ID ones, so a probe on raw G_low gives them
extreme logits and high confidence: in the demo its MSP and energy rank OOD above ID,
AUROC 0.32 and 0.15, against 0.97 and 0.98 normalised).

optionally ensembled with a forward score of the same forward pass:

    score = base(G_low) + a · forward,   forward = ReAct's energy log Σ_j exp((W min(v, c) + b)_j)
                                          (ensemble="react", c the react_percentile-th ID
                                          activation), the model's energy ("energy") or MSP ("msp")

(which ranks as a'·base + forward with a' = 1/a). score_parts() returns every
term from one pass, so a sweep over `a` needs no refit, and with_score() scores
the same fitted subspace with another base score or ensemble without a second
fit of the subspace (only the new score's statistics, from the stored ID G_low).

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

import math
from typing import Any, Dict, Iterable, List, Optional, Union

import numpy as np
import torch
from torch import nn

from gradood import model_io, scores
from gradood._checks import check_class_indices
from gradood.detectors import lowdim_scores
from gradood.detectors._base import Data, Detector, eval_mode, fitted
from gradood.detectors._head import HeadName
from gradood.detectors.lowdim_probe import train_probe
from gradood.detectors.lowdim_scores import BASE_SCORES, PROBE_SCORES
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
from gradood.mahalanobis import ClassGaussians, fit_class_gaussians, mahalanobis_score
from gradood.model_io import Inputs, LogitsFn
from gradood.persample import _verify
from gradood.persample.engine import ParamSelector, PerSampleGradients, _select, persample_gradients

SUBSPACES = ("pca", "class")
ENSEMBLES = (None, "react", "energy", "msp")
#: The parts of score_parts() holding each ensemble's forward score.
FORWARD_PARTS = {"react": "react_energy", "energy": "forward_energy", "msp": "forward_msp"}
#: Settings with_score() may change: the base score's and the ensemble's, not the subspace's.
SCORE_SETTINGS = (
    "normalise",
    "ensemble",
    "a",
    "neighbours",
    "metric",
    "temperature",
    "epsilon",
    "clip_start",
    "clip_percentile",
    "bats_lambda",
    "probe_lr",
    "probe_epochs",
    "probe_batch_size",
    "probe_seed",
)


class LowDimGrad(Detector):
    fitted = ("subspace", "id_low", "id_targets", "num_classes", "clip", "probe", "low_clip", "gaussians")

    def __init__(
        self,
        model: nn.Module,
        subspace: str = "pca",
        dim: Optional[int] = None,
        score: str = "knn",
        normalise: bool = True,
        neighbours: int = 5,
        metric: str = "squared_l2",
        ensemble: Union[None, bool, str] = None,
        a: float = 1.0,
        react_percentile: float = 90.0,
        temperature: Optional[float] = None,
        epsilon: float = 0.0014,
        clip_start: int = 10,
        clip_percentile: float = 90.0,
        bats_lambda: float = 1.0,
        probe_lr: float = 0.1,
        probe_epochs: int = 10,
        probe_batch_size: int = 128,
        probe_seed: int = 0,
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
        arguments = {name: value for name, value in locals().items() if name not in ("self", "model", "__class__")}
        super().__init__(model, head, logits)
        _verify.call_check_count(type(self).__name__, verify)  # a bad value fails here, not at score time
        self.verify = verify
        self._arguments = arguments  # with_score() builds its detector from these
        name = type(self).__name__
        if subspace not in SUBSPACES:
            raise ValueError(f"{name}: subspace must be one of {SUBSPACES}, got {subspace!r}")
        if subspace == "class" and dim is not None:
            raise ValueError(f"{name}: subspace='class' has one direction per class; leave dim unset")
        if score not in BASE_SCORES:
            raise ValueError(f"{name}: score must be one of {BASE_SCORES}, got {score!r}")
        ensemble = {True: "react", False: None}.get(ensemble, ensemble) if isinstance(ensemble, bool) else ensemble
        if ensemble not in ENSEMBLES:
            raise ValueError(f"{name}: ensemble must be one of {ENSEMBLES} (True means 'react'), got {ensemble!r}")
        for argument, value, low in (
            ("dim", dim, 1),
            ("neighbours", neighbours, 1),
            ("oversample", oversample, 0),
            ("iterations", iterations, 1),
            ("max_samples", max_samples, 1),
            ("clip_start", clip_start, 0),
            ("probe_epochs", probe_epochs, 1),
            ("probe_batch_size", probe_batch_size, 2),
        ):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"{name}: {argument} must be an integer ≥ {low}, got {value!r}")
        if metric not in METRICS:
            raise ValueError(f"{name}: metric must be one of {METRICS}, got {metric!r}")
        if classes not in ("labels", "predicted"):
            raise ValueError(f"{name}: classes must be 'labels' or 'predicted', got {classes!r}")
        if dtype not in (None, torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise ValueError(f"{name}: dtype (the storage of the directions) must be a float dtype, got {dtype}")
        for argument, share in (("react_percentile", react_percentile), ("clip_percentile", clip_percentile)):
            if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 < share <= 100:
                raise ValueError(f"{name}: {argument} must lie in (0, 100], got {share!r}")
        for argument, number in (("temperature", temperature), ("bats_lambda", bats_lambda), ("probe_lr", probe_lr)):
            if number is not None and (
                not isinstance(number, (int, float))
                or isinstance(number, bool)
                or not math.isfinite(number)
                or number <= 0
            ):
                raise ValueError(f"{name}: {argument} must be a finite number > 0, got {number!r}")
        if (
            not isinstance(epsilon, (int, float))
            or isinstance(epsilon, bool)
            or not math.isfinite(epsilon)
            or epsilon < 0
        ):
            raise ValueError(f"{name}: epsilon must be a finite number ≥ 0, got {epsilon!r}")
        self.subspace_kind, self.dim = subspace, (200 if dim is None and subspace == "pca" else dim)
        if score == "react" and self.dim is not None and clip_start >= self.dim:
            raise ValueError(
                f"{name}: clip_start={clip_start} must be below dim={self.dim} (ReAct on G_low clips the "
                "coordinates from clip_start on)"
            )
        if not isinstance(normalise, bool):
            raise ValueError(f"{name}: normalise must be True or False, got {normalise!r}")
        self.score_name, self.ensemble, self.normalise = score, ensemble, normalise
        self.neighbours, self.metric, self.a = neighbours, metric, float(a)
        self.react_percentile = react_percentile
        self.temperature = float(temperature if temperature is not None else (1000.0 if score == "odin" else 1.0))
        self.epsilon, self.clip_start, self.clip_percentile = float(epsilon), clip_start, float(clip_percentile)
        self.bats_lambda = float(bats_lambda)
        self.probe_lr, self.probe_epochs, self.probe_batch_size, self.probe_seed = (
            float(probe_lr),
            probe_epochs,
            probe_batch_size,
            probe_seed,
        )
        self.params, self.functional_params, self.fallback = params, functional_params, fallback
        self.classes, self.oversample, self.iterations, self.seed = classes, oversample, iterations, seed
        self.dtype, self.max_samples, self.progress = dtype, max_samples, progress
        self.subspace: Optional[GradientSubspace] = None
        #: G_low [N, K] of every fit sample (unnormalised), and their classes (labels or predictions) or None.
        self.id_low: Optional[torch.Tensor] = None
        self.id_targets: Optional[torch.Tensor] = None
        self.num_classes: Optional[int] = None
        self.clip: Optional[float] = None  # ReAct's feature clip of ensemble="react"
        self.probe: Optional[Dict[str, torch.Tensor]] = None
        self.low_clip: Optional[float] = None  # score="react": the clip of G_low's coordinates
        self.gaussians: Optional[Dict[str, torch.Tensor]] = None  # score="mahalanobis"
        self._bank: Optional[torch.Tensor] = None
        self._num_classes_seen: Optional[int] = None
        #: After fit: samples used, subspace dimension and, for PCA, the covariance eigenvalues of
        #: the K directions and how much the last iteration changed them: subspace_change (sine of
        #: the largest principal angle; dominated by the last directions when the spectrum is flat
        #: there) and eigenvalue_change (largest relative change). Raise `iterations` if too large.
        self.fit_info: Dict[str, Any] = {}

    @property
    def bank(self) -> Optional[torch.Tensor]:
        """The KNN bank: the L2-normalised G_low of every fit sample."""
        if self._bank is None and self.id_low is not None:
            self._bank = normalise_rows(self.id_low)
        return self._bank

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
        self._num_classes_seen = grads.logits.shape[1]
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
        """Fits z, σ, the subspace, G_low of every fit sample (the KNN bank, the probe's and
        the Gaussians' training data), the base score's statistics and, for
        ensemble='react', ReAct's clip, on ID data: a tensor, an (inputs, labels) pair, or
        a re-iterable of batches (a DataLoader; not a one-shot iterator). The classes
        (labels, or the model's predictions with classes='predicted') are needed for
        subspace='class' and for the probe's and Mahalanobis's scores."""
        name = type(self).__name__
        if not isinstance(id_data, (torch.Tensor, tuple, list)) and iter(id_data) is id_data:
            raise TypeError(
                f"{name}.fit: id_data is a one-shot iterator, but fitting makes several passes; "
                "pass a DataLoader, a list of batches or a tensor"
            )
        passes = self._passes(id_data)
        react = self.ensemble == "react"
        if react:  # ReAct needs the linear head, found on one batch; the KNN term does not
            first = next(iter(passes()), None)
            if first is not None:
                self.forward_features(first[0])

        features: List[torch.Tensor] = []
        report = progress_bar(self.progress, f"{name}.fit: gradient moments")
        try:
            moments, class_sums, class_counts = moments_pass(
                lambda inputs: self._gradients(inputs, features if react else None),
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
            low, labels, predicted = fit.projections, fit.labels, fit.predicted
        else:  # per-class directions, or directions stored in a half type: project with what is stored
            rows, label_rows, predicted_rows = [], [], []
            report = progress_bar(self.progress, f"{name}.fit: ID G_low")
            for inputs, batch_labels in passes():
                grads = self._gradients(inputs)
                rows.append(self.subspace.project(grads))
                label_rows.append(batch_labels)
                predicted_rows.append(grads.logits.argmax(1))
                report.update(model_io.batch_size(inputs))
            report.close()
            low, predicted = torch.cat(rows), torch.cat(predicted_rows)
            present = [t for t in label_rows if t is not None]
            labels = torch.cat([t.reshape(-1) for t in present]) if len(present) == len(label_rows) else None
        self.num_classes = int(fitted(self._num_classes_seen, "the number of classes"))
        targets = predicted if self.classes == "predicted" else labels
        if targets is not None:
            try:
                check_class_indices(f"{name}.fit", "labels", targets)
            except ValueError:
                self.subspace = None
                raise
            targets = targets.to(low.device).long()
            if targets.shape[0] != low.shape[0] or bool(((targets < 0) | (targets >= self.num_classes)).any()):
                self.subspace = None
                raise ValueError(
                    f"{name}.fit: labels must be one per sample in [0, {self.num_classes}) (the model's classes), "
                    f"got {targets.shape[0]} labels in {int(targets.min())}..{int(targets.max())}"
                )
        self.id_low, self.id_targets, self._bank = low, targets, None
        if react:
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
        try:
            self._fit_score()
        except ValueError:
            self.subspace = self.id_low = None
            raise
        return self

    def _fit_score(self) -> None:
        """The base score's statistics from the stored ID G_low (no pass over the data)."""
        name, low, score = type(self).__name__, self._rows(fitted(self.id_low)), self.score_name
        self.probe = self.low_clip = self.gaussians = None
        if score == "knn" and low.shape[0] < self.neighbours:
            raise ValueError(
                f"{name}.fit: neighbours={self.neighbours} needs at least that many fit samples, got "
                f"{low.shape[0]}; lower neighbours or fit on more data"
            )
        if score == "react" and self.clip_start >= low.shape[1]:
            raise ValueError(
                f"{name}: clip_start={self.clip_start} must be below the subspace dimension K={low.shape[1]} "
                "(ReAct on G_low clips the coordinates from clip_start on)"
            )
        if score not in PROBE_SCORES and score != "mahalanobis":
            return
        if self.id_targets is None:
            raise ValueError(
                f"{name}.fit: score={score!r} needs the ID samples' classes, but the fit data give no labels: pass "
                "batches of (inputs, labels), or classes='predicted' (the model's predicted classes)"
            )
        if score == "mahalanobis":
            gaussians = fit_class_gaussians(
                low, self.id_targets, f"{name}.fit (score='mahalanobis')", singular="pseudo-inverse"
            )
            self.gaussians = gaussians._asdict()
            return
        if low.shape[0] < 2:
            raise ValueError(f"{name}.fit: the probe needs at least 2 fit samples, got {low.shape[0]}")
        if score == "react":
            values = low[:, self.clip_start :].detach().flatten().double().cpu().numpy()
            self.low_clip = float(np.percentile(values, self.clip_percentile))
        self.probe = train_probe(
            low,
            self.id_targets,
            fitted(self.num_classes),
            self.probe_lr,
            self.probe_epochs,
            self.probe_batch_size,
            self.probe_seed,
            self.progress,
        )

    def with_score(self, score: str, **settings: Any) -> LowDimGrad:
        """A detector scoring this one's fitted subspace (shared, not copied) with another
        base score and/or ensemble: only the new score's statistics are fitted, from the
        stored ID G_low (a probe trained, class Gaussians fitted), with no pass over the
        data. `settings` may change the SCORE_SETTINGS (ensemble, a, neighbours, metric,
        temperature, epsilon, clip_start, clip_percentile, bats_lambda, probe_*); the
        subspace's settings cannot change (fit a new detector for that). ensemble='react'
        needs this detector fitted with it (its clip comes from the ID features)."""
        name = type(self).__name__
        self._require_fitted()
        other_settings = sorted(set(settings) - set(SCORE_SETTINGS))
        if other_settings:
            raise ValueError(
                f"{name}.with_score: {other_settings} set the subspace or the fit, which with_score shares; "
                f"it may change {SCORE_SETTINGS} (fit a new LowDimGrad for the others)"
            )
        arguments = {**self._arguments, "score": score, **settings}
        if "temperature" not in settings and score != self.score_name:
            arguments["temperature"] = None  # the new score's default
        other = type(self)(self.model, **arguments)
        if other.ensemble == "react" and (self.clip is None or other.react_percentile != self.react_percentile):
            raise ValueError(
                f"{name}.with_score: ensemble='react' needs ReAct's clip of the ID features, which this detector "
                "did not fit (fit it with ensemble='react' and the same react_percentile)"
            )
        for attribute in ("subspace", "id_low", "id_targets", "num_classes", "clip", "fit_info"):
            setattr(other, attribute, getattr(self, attribute))
        other._bank = self._bank
        other._head, other.head_name, other._headless = self._head, self.head_name, self._headless
        other.model_interface = self.model_interface
        other._fit_score()
        return other

    # -- scoring ------------------------------------------------------------------------

    def _rows(self, low: torch.Tensor) -> torch.Tensor:
        """What the probe and the Gaussians see: ĝ = G_low/‖G_low‖ (normalise=True), or G_low."""
        return normalise_rows(low) if self.normalise else low

    def base_score(self, low: torch.Tensor) -> torch.Tensor:
        """The base score [B] of G_low rows [B, K] (see the module docstring)."""
        score = self.score_name
        if score == "knn":  # normalises the rows itself
            return knn_score(low, fitted(self.bank).to(low.device), self.neighbours, self.metric)
        low = self._rows(low)
        if score == "mahalanobis":
            return mahalanobis_score(low, ClassGaussians(**fitted(self.gaussians)))
        probe, t = fitted(self.probe), self.temperature
        if score == "msp":
            return lowdim_scores.msp(low, probe, t)
        if score == "energy":
            return lowdim_scores.energy(low, probe, t)
        if score == "odin":
            return lowdim_scores.odin(low, probe, t, self.epsilon)
        if score == "gradnorm":
            return lowdim_scores.gradnorm(low, probe, t)
        if score == "react":
            return lowdim_scores.react(low, probe, self.clip_start, fitted(self.low_clip), t)
        return lowdim_scores.bats(low, probe, self.bats_lambda, t)

    def score_parts(self, inputs: Inputs) -> Dict[str, torch.Tensor]:
        """Every term from one pass: the base score under its name ("knn", "msp", ...) and,
        with an ensemble, the forward score ("react_energy", "forward_energy" or
        "forward_msp"); score = base + a · forward. A sweep over `a` needs these once,
        not a refit per value."""
        self._require_fitted()
        features: List[torch.Tensor] = []
        grads = self._gradients(inputs, features if self.ensemble == "react" else None)
        low = fitted(self.subspace).project(grads)
        base = self.base_score(low)
        parts = {self.score_name: base}
        if self.ensemble == "react":
            weight, bias = self.head_weight_bias()
            v = features[0]
            energy = scores.react(v, weight.to(v.dtype), None if bias is None else bias.to(v.dtype), fitted(self.clip))
            parts["react_energy"] = energy.to(base.dtype)
        elif self.ensemble == "energy":
            parts["forward_energy"] = scores.energy(grads.logits.detach()).to(base.dtype)
        elif self.ensemble == "msp":
            parts["forward_msp"] = scores.msp(grads.logits.detach()).to(base.dtype)
        return parts

    def score(self, inputs: Inputs) -> torch.Tensor:
        parts = self.score_parts(inputs)
        base = parts[self.score_name]
        return base if self.ensemble is None else base + self.a * parts[FORWARD_PARTS[self.ensemble]]

    def score_features(self, logits, features):
        raise NotImplementedError(f"{type(self).__name__} needs the per-sample gradients: use score(inputs)")

    # -- state ----------------------------------------------------------------------------

    def _require_fitted(self) -> None:
        needs = {"mahalanobis": self.gaussians, "react": self.low_clip}.get(self.score_name, True)
        if self.score_name in PROBE_SCORES and self.probe is None:
            needs = None
        if self.subspace is None or self.id_low is None or needs is None:
            raise RuntimeError(f"{type(self).__name__}: call fit(id_data) first")
        if self.ensemble == "react" and self.clip is None:
            raise RuntimeError(f"{type(self).__name__}: fitted without ensemble='react'; refit to use it")

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
        self._bank = None
        if state["subspace"] is not None:
            self.subspace = GradientSubspace.from_state_dict(state["subspace"])
        return self

    def to(self, device) -> LowDimGrad:
        if self.subspace is not None:
            self.subspace = self.subspace.to(device)
        for name in ("id_low", "id_targets", "_bank"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        for name in ("probe", "gaussians"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, {k: None if t is None else t.to(device) for k, t in value.items()})
        return self
