"""The base class of every detector, and the capture of a classifier's head.

A detector wraps any classifier `nn.Module`: its inputs are a tensor or a
mapping of keyword arguments (a tokenised batch), its output the logits [B, C],
a `ModelOutput`/dict with `logits`, a tuple led by the logits, or anything a
`logits=` callable maps to them (gradood.model_io). The head producing the
logits and its input, the penultimate features [B, D], are found with forward
hooks on the first call (gradood.detectors._head: one linear layer, a head run on
every token of which one row per sample is the logits, or two averaged heads);
`head="name"` (or a pair of names) names it instead. The user's model is never
modified: hooks live only for one forward, no `.grad` is written, and the
training mode is switched to eval for scoring and restored afterwards, also on
exceptions.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple, TypeVar, Union

import torch
from torch import nn

from gradood import metrics, model_io, scores
from gradood.detectors import _head
from gradood.detectors._head import HeadName
from gradood.model_io import Inputs, LogitsFn

Data = Union[torch.Tensor, Iterable, Dict[str, Any]]


def iterate_inputs(data: Data) -> Iterator[Inputs]:
    """Input batches from one batch (a tensor or a mapping of tensors), or an
    iterable of batches that are inputs, (inputs, targets, ...) tuples or mappings
    with a labels entry, such as a DataLoader (gradood.model_io)."""
    for inputs, _ in model_io.iterate(data):
        yield inputs


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for the duration, each module's own flag restored afterwards."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags.items():
            module.training = flag


def _plain(value: Any) -> bool:
    """A setting that saves, loads and compares as a value (numbers, strings, dtypes, lists of them)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype))


def _same_setting(a: Any, b: Any) -> bool:
    """Equal settings: 90 and 90.0 are, True and 1 are not; NaN equals NaN; lists item by item."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return isinstance(a, bool) == isinstance(b, bool) and isinstance(a, str) == isinstance(b, str) and a == b


_Value = TypeVar("_Value")


def fitted(value: Optional[_Value], what: str = "a fitted statistic") -> _Value:
    """A fitted statistic (or state found on the first call) that the caller has just
    checked is set (Detector._require_fitted): its value, typed as present."""
    if value is None:  # pragma: no cover - the caller's check raised first
        raise RuntimeError(f"{what} is missing: call fit(id_data) first")
    return value


class Detector:
    """Base class: subclasses implement `score_features` (forward-only detectors)
    or override `score`. Scores are ID-scores: higher = more in-distribution."""

    #: Names of the fitted statistics (attributes) saved by state_dict().
    fitted: Tuple[str, ...] = ()
    #: Constructor arguments that are not configuration of the scores (saved states ignore them).
    not_configuration: Tuple[str, ...] = (
        "self",
        "model",
        "head",
        "logits",
        "progress",
        "functional_params",
        "fallback",
        "verify",
    )

    def __init_subclass__(cls, **kwargs):
        """Records each detector's constructor arguments (the outermost __init__'s, with
        defaults) as its configuration: state_dict() saves the plain ones, and
        load_state_dict() refuses a state saved under other values — fitted statistics and
        a calibrated threshold depend on all of them (percentile, clip, a, T, mode, ...)."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            if "_configuration" not in self.__dict__:  # the outermost constructor: a parent's sees the same call
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                self._configuration = {
                    name: value
                    for name, value in bound.arguments.items()
                    if name not in type(self).not_configuration and _plain(value)
                }
            init(self, *args, **kw)

        cls.__init__ = recording_init

    #: False for scores of the logits alone (MSP, MaxLogit, Energy, ODIN, KL matching):
    #: they also work on models whose logits no linear head produces (SqueezeNet).
    uses_features: bool = True

    def __init__(self, model: nn.Module, head: Optional[HeadName] = None, logits: LogitsFn = None):
        name = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name}: model must be an nn.Module, got {type(model).__name__}")
        if logits is not None and not callable(logits):
            raise TypeError(
                f"{name}: logits must be a callable mapping the model's output to logits, got {type(logits).__name__}"
            )
        self.model = model
        self.logits_fn = logits
        self.head_name: Optional[Union[str, Tuple[str, ...]]] = None
        self._head: Optional[_head.Head] = None
        self._named_head: Optional[Tuple[str, ...]] = None  # named by the user, its kind found on the first call
        self._headless = False  # no head produces the logits, and this detector needs none
        self.model_interface: Optional[Tuple[bool, bool]] = None
        self.threshold: Optional[float] = None
        if head is not None:
            names = (head,) if isinstance(head, str) else tuple(head)
            if not 1 <= len(names) <= 2 or not all(isinstance(n, str) for n in names):
                raise TypeError(
                    f"{name}: head must be a module name or a pair of names (two averaged heads), got {head!r}"
                )
            modules = dict(model.named_modules())
            for module_name in names:
                if module_name not in modules:
                    raise ValueError(f"{name}: the model has no module named {module_name!r}")
            self._named_head = names
            self.head_name = head if isinstance(head, str) else names

    # -- the head -----------------------------------------------------------------

    @property
    def head(self) -> nn.Module:
        """The head module (the first of two averaged heads)."""
        if self.head_name is None:
            raise RuntimeError(
                f"{type(self).__name__}: the head is found on the first forward pass; score or fit first"
            )
        names = (self.head_name,) if isinstance(self.head_name, str) else self.head_name
        return self.model.get_submodule(names[0])

    def head_weight_bias(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(W [C, D], b [C] or None) of the head (for two averaged heads, the equivalent
        single head: W = [W₁ W₂], b = (b₁ + b₂)/2; gradood.detectors._head)."""
        if self._head is None:
            raise RuntimeError(
                f"{type(self).__name__}: the head is found on the first forward pass; score or fit first"
            )
        return _head.weight_bias(self.model, self._head)

    def forward_features(self, inputs: Inputs) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, C], penultimate features [B, D]) from one forward pass, in eval
        mode and without autograd."""
        with torch.no_grad(), eval_mode(self.model):
            return self._forward_with_capture(inputs)

    def model_logits(self, output: Any, batch: int) -> torch.Tensor:
        """The logits [B, C] in the model's output (checked)."""
        return model_io.checked_logits(type(self).__name__, output, batch, self.logits_fn)

    def head_hooks(self, captured: _head.Captured) -> list:
        """Forward hooks capturing (input, output) of the head (or of every candidate
        while the head is unknown) into `captured`; returns their handles."""
        if self._head is not None:
            names = self._head.names
        elif self._named_head is not None:
            names = self._named_head
        elif self._headless:
            names = ()
        else:
            names = tuple(name for name, module in self.model.named_modules() if _head.is_candidate(module))
            if not names and self.uses_features:
                raise ValueError(
                    f"{type(self).__name__}: found no nn.Linear or 1×1 nn.Conv2d head in {type(self.model).__name__}; "
                    "pass head='<module name>' naming the layer that produces the logits"
                )

        def hook(name):
            def capture(module, args, kwargs, output):
                first = args[0] if args else kwargs.get("input")  # head(x) or head(input=x)
                if isinstance(first, torch.Tensor) and isinstance(output, torch.Tensor):
                    captured[name] = _head.Call(first, output, first._version, output._version, module)

            return capture

        return [self.model.get_submodule(name).register_forward_hook(hook(name), with_kwargs=True) for name in names]

    def head_features(self, captured: _head.Captured, logits: torch.Tensor) -> torch.Tensor:
        """The penultimate features [B, D] from a pass's captures: finds (or checks) the
        head on the first call, checks on every call that it still produces the logits
        (output equality and a random projection of its affine map: O(B·D) work); [B, 0] for a detector that uses none on a model
        without a head."""
        where = type(self).__name__
        if self._head is None and not self._headless:
            if self._named_head is not None:
                kind = _head.kind_of(self._named_head, captured, logits)
                if kind is None:
                    modules = ", ".join(
                        f"{n!r} ({type(self.model.get_submodule(n)).__name__})" for n in self._named_head
                    )
                    raise ValueError(
                        f"{where}: head {modules} does not produce the model's logits {tuple(logits.shape)} (its output "
                        "differs, was modified in place afterwards, is not its weight and bias applied to its input, "
                        "or it was not called): the last-layer scores need logits = head(features), or the mean of two "
                        "named heads"
                    )
                self._head = _head.Head(self._named_head, kind)
            else:
                found = _head.find(captured, logits)
                if found is None:
                    if self.uses_features:
                        raise ValueError(
                            f"{where}: no nn.Linear or 1×1 nn.Conv2d in {type(self.model).__name__} produces the logits "
                            "directly; pass head='<module name>' (searched: one layer producing them, one run on every "
                            "token producing one row per sample, two layers whose outputs are averaged)"
                        )
                    self._headless = True
                else:
                    self._head = found
                    self.head_name = found.name
        elif self._head is not None and not _head.produces(self._head, captured, logits):
            raise ValueError(
                f"{where}: on this batch the head {self.head_name!r} did not produce the model's logits (its output "
                "differs from them, was modified in place afterwards, or is not its weight and bias applied to its "
                "input: a hook, a temperature or a clamp after the head changed since the first call), so the "
                "last-layer scores would be wrong; the model must keep logits = head(features)"
            )
        if self._headless:
            return logits.new_zeros(logits.shape[0], 0)
        if self._head is None:  # found above, or the call raised
            raise RuntimeError(f"{where}: the head of the model was not found")
        return _head.features(where, self._head, captured, logits)

    def _forward_with_capture(self, inputs: Inputs) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, features); features are [B, 0] for a detector that uses none on a
        model without a linear head."""
        batch = model_io.check_inputs(type(self).__name__, inputs)
        captured: _head.Captured = {}
        handles = self.head_hooks(captured)
        try:
            output = model_io.call(self.model, inputs)
        finally:
            for handle in handles:
                handle.remove()
        logits = self.model_logits(output, batch)
        #: Whether the model took keyword arguments and returned something other than the logits (for OODHead).
        self.model_interface = (
            model_io.is_mapping(inputs),
            not isinstance(output, torch.Tensor) or self.logits_fn is not None,
        )
        return logits, self.head_features(captured, logits)

    # -- scoring ----------------------------------------------------------------------

    def score(self, inputs: Inputs) -> torch.Tensor:
        """ID-scores [B] of a batch of inputs (a tensor, or a mapping of keyword arguments)."""
        logits, features = self.forward_features(inputs)
        return self.score_features(logits, features)

    def score_features(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """ID-scores [B] from logits and penultimate features a server already holds."""
        spec = self.lastlayer_spec(logits.shape[1] if isinstance(logits, torch.Tensor) and logits.dim() == 2 else 0)
        if spec is None:
            raise NotImplementedError(f"{type(self).__name__} needs the inputs: use score(inputs)")
        return scores.apply_spec(f"{type(self).__name__}.score_features", logits, features, spec)

    def lastlayer_spec(self, num_classes: int) -> Optional[scores.ScoreSpec]:
        """The fused kernel's recipe for this detector's score (gradood.scores.ScoreSpec),
        for detectors that are one lastlayer_score call; None otherwise."""
        return None

    def collect(self, data: Data) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, features) of every batch of `data`, concatenated."""
        pairs = [self.forward_features(batch) for batch in iterate_inputs(data)]
        if not pairs:
            raise ValueError(f"{type(self).__name__}: the data holds no batch")
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    def fit(self, id_data: Data) -> Detector:
        """Fits the detector's ID statistics (none for this detector); returns self."""
        return self

    def first_samples(self, data: Data, max_samples: Optional[int]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(logits, features) of each batch of `data`, stopping after max_samples samples (the last
        batch cut there; every sample for None) — the banks' and subspaces' fit streams."""
        seen = 0
        for inputs in iterate_inputs(data):
            if max_samples is not None and seen >= max_samples:
                return
            logits, features = self.forward_features(inputs)
            if max_samples is not None:
                logits, features = logits[: max_samples - seen], features[: max_samples - seen]
            seen += features.shape[0]
            yield logits, features

    def mean_id_features(self, id_data: Data, where: Optional[str] = None) -> torch.Tensor:
        """The mean penultimate feature [D] of `id_data`, summed in float64 over the batches as
        they stream (DICE's v̄, fDBD's μ, GrOOD's OOD prototype); raises on no sample or a
        non-finite mean, naming `where` (the detector's fit by default)."""
        name = where or f"{type(self).__name__}.fit"
        total: Optional[torch.Tensor] = None
        count = 0
        for inputs in iterate_inputs(id_data):
            features = self.forward_features(inputs)[1]
            batch_sum = features.double().sum(0)
            total = batch_sum if total is None else total + batch_sum
            count += features.shape[0]
        if total is None or count == 0:
            raise ValueError(f"{name}: the data holds no sample")
        mean = total / count
        if not bool(torch.isfinite(mean).all()):
            raise ValueError(f"{name}: the ID features hold NaN or Inf")
        return mean

    def _require_fitted(self) -> None:
        missing = [name for name in self.fitted if getattr(self, name, None) is None]
        if missing:
            raise RuntimeError(f"{type(self).__name__}: call fit(id_data) first (missing {', '.join(missing)})")

    # -- thresholds -------------------------------------------------------------------

    def calibrate(self, id_scores: Any, tpr: float = 0.95) -> float:
        """Stores and returns the threshold keeping `tpr` of the ID scores at or above
        it (the convention of metrics.fpr_at_95_tpr)."""
        array = metrics._as_scores(f"{type(self).__name__}.calibrate", "id_scores", id_scores)
        self.threshold = metrics._tpr_threshold(f"{type(self).__name__}.calibrate", array, tpr)
        return self.threshold

    def is_ood(self, inputs: Inputs) -> torch.Tensor:
        """Boolean [B]: score below the calibrated threshold."""
        if self.threshold is None:
            raise RuntimeError(f"{type(self).__name__}: call calibrate(id_scores) first")
        return self.score(inputs) < self.threshold

    # -- state --------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        state = {name: getattr(self, name) for name in self.fitted}
        state["threshold"] = self.threshold
        state["head_name"] = self.head_name
        state["head_kind"] = None if self._head is None else self._head.kind
        state["configuration"] = dict(self.__dict__.get("_configuration", {}))
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> Detector:
        where = f"{type(self).__name__}.load_state_dict"
        expected = set(self.fitted) | {"threshold", "head_name", "head_kind", "configuration"}
        if set(state) != expected:
            raise ValueError(f"{where}: expected keys {sorted(expected)}, got {sorted(state)}")
        state = dict(state)
        saved, current = state.pop("configuration"), self.__dict__.get("_configuration", {})
        for name in sorted(set(saved) | set(current)):
            if name not in saved or name not in current or not _same_setting(saved[name], current[name]):
                raise ValueError(
                    f"{where}: the state was saved with {name}={saved.get(name, '<unset>')!r}, but this detector "
                    f"has {name}={current.get(name, '<unset>')!r}; construct it with {name}={saved.get(name)!r}, or "
                    "fit (and calibrate) it again"
                )
        kind, head_name = state.pop("head_kind"), state.pop("head_name")
        for name, value in state.items():
            setattr(self, name, value)
        if head_name is not None:
            names = (head_name,) if isinstance(head_name, str) else tuple(head_name)
            if kind not in _head.KINDS or len(names) != (2 if kind == "mean" else 1):
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: head {head_name!r} of kind {kind!r} is invalid"
                )
            self._head, self.head_name = _head.Head(names, kind), head_name
        return self

    def to(self, device: Union[str, torch.device]) -> Detector:
        """Moves the fitted statistics (not the model, which stays the caller's)."""
        for name in self.fitted:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self
