"""The base class of every detector, and the capture of a classifier's head.

A detector wraps any classifier `nn.Module` returning logits [B, C]. The last
`nn.Linear` (or 1×1 `nn.Conv2d`) whose output is the logits is found with
forward hooks on the first call; its input is the penultimate feature vector
[B, D]. `head="name"` names the module instead. The user's model is never
modified: hooks live only for one forward, no `.grad` is written, and the
training mode is switched to eval for scoring and restored afterwards, also on
exceptions.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple, Union

import torch
from torch import nn

from gradood import metrics, scores

Data = Union[torch.Tensor, Iterable]


def iterate_inputs(data: Data) -> Iterator[torch.Tensor]:
    """Input batches from a tensor (one batch), or an iterable of batches that are
    tensors or (inputs, targets, ...) tuples, such as a DataLoader."""
    if isinstance(data, torch.Tensor):
        yield data
        return
    for batch in data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


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


def _is_head_candidate(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


class Detector:
    """Base class: subclasses implement `score_features` (forward-only detectors)
    or override `score`. Scores are ID-scores: higher = more in-distribution."""

    #: Names of the fitted statistics (attributes) saved by state_dict().
    fitted: Tuple[str, ...] = ()
    #: False for scores of the logits alone (MSP, MaxLogit, Energy, ODIN, KL matching):
    #: they also work on models whose logits no linear head produces (SqueezeNet).
    uses_features: bool = True

    def __init__(self, model: nn.Module, head: Optional[str] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.head_name = head
        self._head_checked = False  # a named head is checked to produce the logits on the first forward
        self._headless = False  # no head produces the logits, and this detector needs none
        self.threshold: Optional[float] = None
        if head is not None and head not in dict(model.named_modules()):
            raise ValueError(f"{type(self).__name__}: the model has no module named {head!r}")

    # -- the head -----------------------------------------------------------------

    @property
    def head(self) -> nn.Module:
        if self.head_name is None:
            raise RuntimeError(f"{type(self).__name__}: the head is found on the first forward pass; score or fit first")
        return self.model.get_submodule(self.head_name)

    def head_weight_bias(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        head = self.head
        weight = head.weight.detach().reshape(head.weight.shape[0], -1)
        bias = None if head.bias is None else head.bias.detach()
        return weight, bias

    def forward_features(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, C], penultimate features [B, D]) from one forward pass, in eval
        mode and without autograd."""
        with torch.no_grad(), eval_mode(self.model):
            return self._forward_with_capture(inputs)

    def _forward_with_capture(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, features); features are [B, 0] for a detector that uses none on a
        model without a linear head."""
        captured: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        if self.head_name is not None:  # the hot path: one hook, found by its path
            candidates = {self.head_name: self.model.get_submodule(self.head_name)}
        elif self._headless:
            candidates = {}
        else:
            candidates = {name: m for name, m in self.model.named_modules() if _is_head_candidate(m)}
        if not candidates and self.uses_features:
            raise ValueError(
                f"{type(self).__name__}: found no nn.Linear or 1×1 nn.Conv2d head in {type(self.model).__name__}; "
                "pass head='<module name>' naming the layer that produces the logits"
            )

        def hook(name):
            def capture(module, args, output):
                captured[name] = (args[0], output)

            return capture

        handles = [module.register_forward_hook(hook(name)) for name, module in candidates.items()]
        try:
            logits = self.model(inputs)
        finally:
            for handle in handles:
                handle.remove()
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"{type(self).__name__}: the model must return logits [B, C], got {shape}")
        if self.head_name is None:
            self.head_name = self._find_head(captured, logits, required=self.uses_features)
            if self.head_name is None:  # a detector of the logits alone, on a model without a head
                self._headless = True
                return logits, logits.new_zeros(logits.shape[0], 0)
        elif not self._head_checked and not self._produces(captured.get(self.head_name), logits):
            module = self.model.get_submodule(self.head_name)
            raise ValueError(
                f"{type(self).__name__}: head {self.head_name!r} ({type(module).__name__}) does not produce the model's "
                f"logits {tuple(logits.shape)} (its output differs, or it was not called): the last-layer scores need "
                "logits = head(features)"
            )
        self._head_checked = True
        features = captured[self.head_name][0]
        return logits, features.reshape(features.shape[0], -1)

    @staticmethod
    def _produces(pair, logits: torch.Tensor) -> bool:
        """Whether a captured (input, output) pair's output equals the logits (flattened for a 1×1 conv)."""
        if pair is None:
            return False
        output = pair[1]
        if output.shape[0] != logits.shape[0] or output.numel() != logits.numel() or output.dtype != logits.dtype:
            return False
        return torch.allclose(output.reshape(logits.shape), logits, rtol=0, atol=0, equal_nan=True)

    def _find_head(self, captured, logits, required: bool = True) -> Optional[str]:
        # The last candidate whose output equals the logits.
        for name in reversed(list(captured)):
            if self._produces(captured[name], logits):
                return name
        if not required:
            return None
        raise ValueError(
            f"{type(self).__name__}: no nn.Linear or 1×1 nn.Conv2d in {type(self.model).__name__} produces the "
            "logits directly; pass head='<module name>'"
        )

    # -- scoring ----------------------------------------------------------------------

    def score(self, inputs: torch.Tensor) -> torch.Tensor:
        """ID-scores [B] of a batch of inputs."""
        logits, features = self.forward_features(inputs)
        return self.score_features(logits, features)

    def score_features(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """ID-scores [B] from logits and penultimate features a server already holds."""
        spec = self.lastlayer_spec(logits.shape[1] if isinstance(logits, torch.Tensor) and logits.dim() == 2 else 0)
        if spec is None:
            raise NotImplementedError(f"{type(self).__name__} needs the inputs: use score(inputs)")
        return scores.apply_spec(f"{type(self).__name__}.score_features", logits, features, spec)

    def lastlayer_spec(self, num_classes: int) -> Optional["scores.ScoreSpec"]:
        """The fused kernel's recipe for this detector's score (gradood.scores.ScoreSpec),
        for detectors that are one lastlayer_score call; None otherwise."""
        return None

    def collect(self, data: Data) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, features) of every batch of `data`, concatenated."""
        pairs = [self.forward_features(batch) for batch in iterate_inputs(data)]
        if not pairs:
            raise ValueError(f"{type(self).__name__}: the data holds no batch")
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    def fit(self, id_data: Data) -> "Detector":
        """Fits the detector's ID statistics (none for this detector); returns self."""
        return self

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

    def is_ood(self, inputs: torch.Tensor) -> torch.Tensor:
        """Boolean [B]: score below the calibrated threshold."""
        if self.threshold is None:
            raise RuntimeError(f"{type(self).__name__}: call calibrate(id_scores) first")
        return self.score(inputs) < self.threshold

    # -- state --------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        state = {name: getattr(self, name) for name in self.fitted}
        state["threshold"] = self.threshold
        state["head_name"] = self.head_name
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> "Detector":
        expected = set(self.fitted) | {"threshold", "head_name"}
        if set(state) != expected:
            raise ValueError(f"{type(self).__name__}.load_state_dict: expected keys {sorted(expected)}, got {sorted(state)}")
        for name, value in state.items():
            setattr(self, name, value)
        return self

    def to(self, device: Union[str, torch.device]) -> "Detector":
        """Moves the fitted statistics (not the model, which stays the caller's)."""
        for name in self.fitted:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self
