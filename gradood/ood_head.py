"""gradood.OODHead: a classifier and a forward-only detector as one nn.Module
whose forward returns (logits, score) from a single forward pass.

Made for deployment: it holds no hooks and no Python detector object in its
forward, so it scripts with TorchScript, exports with torch.export, compiles
with torch.compile(fullgraph=True) and packages with AOTInductor. The model is
copied (the caller's is never modified, also not by OODHead.to(device)): the
copy's head is replaced by an identity, so the copy returns the penultimate
features, and the head's weight and bias are held here and applied once. The
copy doubles the weights in memory while the original model is alive; a
server that only needs the head can drop the original. Supported detectors: MSP, MaxLogit,
Energy, GradNorm, ExGrad, UV, RG, RGAdditive (fitted), ReAct (fitted),
KLMatching (fitted).
"""

from __future__ import annotations

import copy
import typing
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gradood import model_io
from gradood._ops import _COMBINE, TERM_NAMES
from gradood.detectors import GradOrth, KLMatching, ReAct, ViM
from gradood.detectors._base import Detector, fitted
from gradood.model_io import Inputs, LogitsFn
from gradood.scores import ScoreSpec


class _PlaceFeatures(nn.Module):
    """Stands in for one of two averaged heads: its input v placed at its columns of
    [v₁; v₂] (zeros elsewhere), so the model's mean of the two returns [v₁; v₂]/2."""

    def __init__(self, before: int, after: int):
        super().__init__()
        self.before, self.after = before, after

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.pad(features, (self.before, self.after))


class _Body(nn.Module):
    """The model with its head replaced, called with keyword arguments and/or read
    through the detector's logits extraction (models that take a tokenised batch
    or return a ModelOutput)."""

    def __init__(self, model: nn.Module, keywords: bool, logits: LogitsFn):
        super().__init__()
        self.model, self.keywords, self.logits_fn = model, keywords, logits

    def forward(self, inputs):
        output = self.model(**inputs) if self.keywords else self.model(inputs)
        return model_io.logits_of("OODHead", output, self.logits_fn)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class OODHead(nn.Module):
    """forward(inputs) -> (logits [B, C], ID-score [B]), one forward pass.

    The detector must know its head: construct it with head="name", or let it
    find the head on a call (score/fit), or pass example_inputs here. Inputs may
    be a mapping of keyword arguments when the model takes them (the head then
    also runs under torch.export and torch.compile, not TorchScript).
    """

    def __init__(self, model: nn.Module, detector: Detector, example_inputs: Optional[Inputs] = None):
        super().__init__()
        if detector.model is not model:
            raise ValueError("OODHead: the detector must wrap this model")
        if detector._head is None or detector.model_interface is None:
            if example_inputs is None:
                raise ValueError("OODHead: the detector has not been called on this model yet; pass example_inputs")
            detector.forward_features(example_inputs)
        head = detector._head
        if head is None:
            raise ValueError(
                f"OODHead: no nn.Linear or 1×1 nn.Conv2d of {type(model).__name__} produces its logits, and OODHead "
                "splits the model at that head; pass head='<module name>' to the detector, or score with the detector"
            )
        weight, bias = detector.head_weight_bias()
        self.register_buffer("weight", weight.clone())
        self.register_buffer(
            "bias",
            bias.clone()
            if bias is not None
            else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
        )
        self.body = copy.deepcopy(model)
        if head.kind == "mean":  # the model's (head₁(v₁) + head₂(v₂))/2 becomes [v₁; v₂]/2
            widths = [typing.cast(torch.Tensor, model.get_submodule(name).weight)[0].numel() for name in head.names]
            _replace(self.body, head.names[0], _PlaceFeatures(0, widths[1]))
            _replace(self.body, head.names[1], _PlaceFeatures(widths[0], 0))
        elif head.names[0] == "":  # the model is its head (a linear probe on given features)
            self.body = nn.Identity()
        else:  # a token head's identity leaves the model's own pick of the token: that token's features
            _replace(self.body, head.names[0], nn.Identity())
        interface = detector.model_interface
        if interface is None:  # set by the call above
            raise RuntimeError("OODHead: the detector has not seen the model's inputs; pass example_inputs")
        keywords, wrapped = interface
        if keywords or wrapped:
            self.body = _Body(self.body, keywords, detector.logits_fn)
        self.body.eval()
        # An inference module: its own copy needs no gradients (the scores are not
        # differentiable; torch.compile then traces no backward graph).
        self.body.requires_grad_(False)

        # What forward computes: one lastlayer_score call ("spec"), ReAct (react_energy), KL matching,
        # ViM (the energy minus α times the residual norm) or GradOrth (‖p − u‖ · ‖Sᵀv‖).
        self.kind = "spec"
        self.mode = "min"
        self.residual_scale = 0.0
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.register_buffer("projection_basis", torch.zeros(0, 0, dtype=compute, device=weight.device))
        self.register_buffer("projection_offset", torch.zeros(0, dtype=torch.float64, device=weight.device))
        self.register_buffer("log_templates", torch.zeros(0, dtype=torch.float32, device=weight.device))
        self.register_buffer("missing_templates", torch.zeros(0, dtype=torch.float32, device=weight.device))
        self.register_buffer("zero_templates", torch.zeros(0, dtype=torch.float32, device=weight.device))
        spec = detector.lastlayer_spec(weight.shape[0])
        if isinstance(detector, ReAct):
            detector._require_fitted()
            self.kind = "react"
            spec = ScoreSpec("energy", clip=float(fitted(detector.clip)))
        elif isinstance(detector, KLMatching):
            detector._require_fitted()
            self.kind, self.mode = "kl_matching", detector.mode
            kl_templates = fitted(detector.templates)
            missing = kl_templates.isnan().any(dim=1)
            templates = kl_templates.masked_fill(missing[:, None], 1.0)  # logs in their float64 (reference)
            zero = templates == 0  # 0 · log 0 = 0, p · log(p/0) = inf (gradood.reference)
            self.log_templates = torch.where(zero, torch.zeros_like(templates), templates.log()).to(
                weight.device, torch.float32
            )
            self.zero_templates = zero.to(weight.device, torch.float32)
            self.missing_templates = torch.where(missing, float("inf"), 0.0).to(weight.device, torch.float32)
            spec = ScoreSpec("energy")
        elif isinstance(detector, ViM):
            detector._require_fitted()
            self.kind, self.residual_scale = "vim", float(fitted(detector.alpha))
            null_space, origin_projection = detector._statistics(compute, weight.device)
            self.projection_basis, self.projection_offset = null_space.clone(), origin_projection.clone()
            spec = ScoreSpec("energy")
        elif isinstance(detector, GradOrth):
            detector._require_fitted()
            self.kind = "gradorth"
            self.projection_basis = fitted(detector.basis).to(weight.device, compute).clone()
            spec = ScoreSpec("energy", temperature=detector.temperature)  # the temperature only
        elif spec is None:
            raise ValueError(
                f"OODHead: {type(detector).__name__} is not exported: OODHead takes the detectors whose score is one "
                "forward pass through gradood's fused operators (MSP, MaxLogit, Energy, GradNorm, ExGrad, UV, RG, "
                "RGAdditive, ReAct, KLMatching, ViM, GradOrth); call the detector's score() or score_features() instead"
            )
        self.logit_term = TERM_NAMES.index(spec.logit_term)
        self.logit_scale = float(spec.logit_scale)
        self.feature_term = TERM_NAMES.index(spec.feature_term) if spec.feature_term is not None else -1
        self.with_bias = bool(spec.with_bias)
        self.combine = _COMBINE[spec.combine]
        self.alpha = float(spec.alpha)
        self.temperature = float(spec.temperature)
        self.clip = float(spec.clip)

    def forward(self, inputs: torch.Tensor):  # or a mapping of keyword arguments, for a model that takes them
        features = self.body(inputs).flatten(1)
        weight, bias = self.weight, self.bias
        assert isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)  # buffers (for the type checker)
        logits = F.linear(features, weight, bias)
        if self.kind == "react":
            score = torch.ops.gradood.react_energy(features, self.weight, self.bias, self.clip)
        elif self.kind == "gradorth":  # as GradOrth.score_features: float64 softmax, S^T v in the features' precision
            compute = torch.float64 if features.dtype == torch.float64 else torch.float32
            p = torch.softmax(logits.double() / self.temperature, dim=1)
            deviation = torch.linalg.vector_norm(p - 1.0 / logits.shape[1], dim=1)
            projection = torch.linalg.vector_norm((features.to(compute) @ self.projection_basis).double(), dim=1)
            score = (deviation * projection).to(compute)
        elif self.kind == "kl_matching":  # in float32, a class without a template left out (gradood.reference)
            log_probs = torch.log_softmax(logits.float(), dim=1)
            probs = log_probs.exp()
            divergences = torch.xlogy(probs, probs).sum(dim=1, keepdim=True) - probs @ self.log_templates.t()
            divergences = divergences.masked_fill((probs > 0).float() @ self.zero_templates.t() > 0, float("inf"))
            divergences = divergences + self.missing_templates
            if self.mode == "min":
                score = -divergences.amin(dim=1)
            else:
                score = -divergences.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
        else:
            score_features: Optional[torch.Tensor] = None
            if self.feature_term >= 0:
                score_features = features
            score = torch.ops.gradood.lastlayer_score(
                logits,
                score_features,
                self.logit_term,
                self.logit_scale,
                self.feature_term,
                self.with_bias,
                self.combine,
                self.alpha,
                self.temperature,
                self.clip,
            )
            if self.kind == "vim":  # as ViM.score_features: Rᵀv − Rᵀo with Rᵀo and the norm in float64
                compute = torch.float64 if features.dtype == torch.float64 else torch.float32
                projection = (features.to(compute) @ self.projection_basis).double() - self.projection_offset
                residual = torch.linalg.vector_norm(projection, dim=1)
                score = (score.double() - self.residual_scale * residual).to(compute)
        return logits, score
