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
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gradood._ops import TERM_NAMES, _COMBINE
from gradood.detectors import KLMatching, ReAct
from gradood.detectors._base import Detector
from gradood.scores import ScoreSpec



def _replace_with_identity(model: nn.Module, name: str) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())


class OODHead(nn.Module):
    """forward(inputs) -> (logits [B, C], ID-score [B]), one forward pass.

    The detector must know its head: construct it with head="name", or let it
    find the head on a call (score/fit), or pass example_inputs here.
    """

    def __init__(self, model: nn.Module, detector: Detector, example_inputs: Optional[torch.Tensor] = None):
        super().__init__()
        if detector.model is not model:
            raise ValueError("OODHead: the detector must wrap this model")
        if detector.head_name is None:
            if example_inputs is None:
                raise ValueError("OODHead: the detector has not found the model's head yet; pass example_inputs")
            detector.forward_features(example_inputs)
        if detector.head_name is None:
            raise ValueError(
                f"OODHead: no nn.Linear or 1×1 nn.Conv2d of {type(model).__name__} produces its logits, and OODHead "
                "splits the model at that head; pass head='<module name>' to the detector, or score with the detector"
            )
        weight, bias = detector.head_weight_bias()
        self.register_buffer("weight", weight.clone())
        self.register_buffer("bias", bias.clone() if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype,
                                                                                        device=weight.device))
        self.body = copy.deepcopy(model)
        _replace_with_identity(self.body, detector.head_name)
        self.body.eval()
        # An inference module: its own copy needs no gradients (the scores are not
        # differentiable; torch.compile then traces no backward graph).
        self.body.requires_grad_(False)

        # What forward computes: one lastlayer_score call ("spec"), ReAct (react_energy) or KL matching.
        self.kind = "spec"
        self.mode = "min"
        self.register_buffer("log_templates", torch.zeros(0, dtype=weight.dtype, device=weight.device))
        spec = detector.lastlayer_spec(weight.shape[0])
        if isinstance(detector, ReAct):
            detector._require_fitted()
            self.kind = "react"
            spec = ScoreSpec("energy", clip=float(detector.clip))
        elif isinstance(detector, KLMatching):
            detector._require_fitted()
            self.kind, self.mode = "kl_matching", detector.mode
            self.log_templates = detector.templates.to(weight.dtype).log()
            spec = ScoreSpec("energy")
        elif spec is None:
            raise ValueError(
                f"OODHead: {type(detector).__name__} needs more than one forward pass; OODHead takes forward-only detectors"
            )
        self.logit_term = TERM_NAMES.index(spec.logit_term)
        self.logit_scale = float(spec.logit_scale)
        self.feature_term = TERM_NAMES.index(spec.feature_term) if spec.feature_term is not None else -1
        self.with_bias = bool(spec.with_bias)
        self.combine = _COMBINE[spec.combine]
        self.alpha = float(spec.alpha)
        self.temperature = float(spec.temperature)
        self.clip = float(spec.clip)

    def forward(self, inputs: torch.Tensor):
        features = self.body(inputs).flatten(1)
        logits = F.linear(features, self.weight, self.bias)
        if self.kind == "react":
            score = torch.ops.gradood.react_energy(features, self.weight, self.bias, self.clip)
        elif self.kind == "kl_matching":
            log_probs = torch.log_softmax(logits, dim=1)
            probs = log_probs.exp()
            divergences = (probs * log_probs).sum(dim=1, keepdim=True) - probs @ self.log_templates.t()
            if self.mode == "min":
                score = -divergences.amin(dim=1)
            else:
                score = -divergences.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
        else:
            score_features: Optional[torch.Tensor] = None
            if self.feature_term >= 0:
                score_features = features
            score = torch.ops.gradood.lastlayer_score(logits, score_features, self.logit_term, self.logit_scale,
                                                      self.feature_term, self.with_bias, self.combine, self.alpha,
                                                      self.temperature, self.clip)
        return logits, score
