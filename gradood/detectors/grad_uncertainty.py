"""GradUncertainty ("Gradients as a Measure of Uncertainty in Neural Networks", Lee & AlRegib,
ICIP 2020, arXiv:2008.08030): the gradient of the binary cross-entropy between the softmax
outputs and the all-ones "confounding label",

    L(x) = Σ_c −log p_c,        p = softmax(f(x)),        ∂L/∂f = C·p − 1,

squared and summed over the layers, with the paper's sign (a large gradient means an uncertain,
out-of-distribution input), returned ID-high:

    score = −Σ_l ‖∇_{θ_l} L(x)‖₂²

layers="network" (the paper's: every parameter, or those `params` selects) takes the per-sample
gradient norms of gradood.persample_grad_norms (one forward, one backward); layers="head" takes
the closed form of the classifier head alone (OpenOOD's choice; one forward, no backward):

    ‖∇_W L‖² + ‖∇_b L‖² = ‖C·p − 1‖₂² · (‖v‖₂² + β),    β = 1 with a bias, 0 without

(for two averaged heads, f = (W₁v₁ + b₁ + W₂v₂ + b₂)/2, β = (number of biases)/4: each bias gets
δ/2). The output term is summed in float64 from the logits term by term, so confident rows keep
their exact value at any logit gap: a softmax with a gap of 100 gives p = e⁻¹⁰⁰ and the term C·p − 1
= −1 (pytorch-ood differentiates torch's binary_cross_entropy of the softmax, whose backward clamps
p(1 − p) at 1e-12: off by up to 94% there). The loss is C times GradNorm's KL(u ‖ p), so the
gradient is C times FullGradNorm's, with the opposite sign convention: GradNorm takes a large norm
for in-distribution. The paper's experiments feed the per-layer squared norms (`layer_norms`) to a
small classifier trained on ID and OOD data; the summed score is its training-free use."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from gradood._checks import check_choice, check_features, check_logits
from gradood.detectors._base import Detector, eval_mode
from gradood.detectors._head import HeadName
from gradood.model_io import Inputs, LogitsFn
from gradood.persample import _verify, persample_grad_norms
from gradood.persample.engine import ParamSelector, PerSampleGradNorms

LAYERS = ("network", "head")


def confounding_loss(logits: torch.Tensor) -> torch.Tensor:
    """L = Σ_c −log softmax(f)_c per sample [B], in float64 (the gradient reaches the model in its
    own dtype)."""
    return -F.log_softmax(logits.double(), dim=1).sum(1)


def output_term(logits: torch.Tensor) -> torch.Tensor:
    """‖∂L/∂f‖₂² = Σ_j (C·p_j − 1)² per sample [B], float64, each term from p_j itself (no
    cancellation between Σ p² and the constant)."""
    check_logits("gradood.detectors.grad_uncertainty.output_term", logits)
    probabilities = torch.softmax(logits.double(), dim=1)
    return (logits.shape[1] * probabilities - 1).square().sum(1)


def head_grad_uncertainty(logits: torch.Tensor, features: torch.Tensor, bias_weight: float = 1.0) -> torch.Tensor:
    """−‖C·p − 1‖² · (‖v‖² + bias_weight) [B]: GradUncertainty's ID-score of the head alone from
    logits [B, C] and the head's input v [B, D] (float64 for float64 inputs, else float32)."""
    where = "gradood.detectors.grad_uncertainty.head_grad_uncertainty"
    check_logits(where, logits)
    check_features(where, features, logits)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    feature_term = features.double().square().sum(1) + bias_weight
    return (-output_term(logits) * feature_term).to(dtype)


class GradUncertainty(Detector):
    def __init__(
        self,
        model: nn.Module,
        layers: str = "network",
        params: ParamSelector = None,
        functional_params: Optional[str] = None,
        fallback: Optional[str] = None,
        verify: Union[bool, int] = True,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        name = type(self).__name__
        self.layers = check_choice(name, "layers", layers, LAYERS)
        if self.layers == "head" and (params is not None or functional_params is not None or fallback is not None):
            raise ValueError(
                f"{name}: params, functional_params and fallback select the network's parameters; layers='head' "
                "takes the head's weight and bias only (use layers='network' with params= for other subsets)"
            )
        _verify.call_check_count(name, verify)  # a bad value fails here, not at score time
        self.params, self.functional_params, self.fallback, self.verify = params, functional_params, fallback, verify
        self.uses_features = self.layers == "head"

    def score(self, inputs: Inputs) -> torch.Tensor:
        if self.layers == "head":
            return super().score(inputs)
        norms = self._network(inputs, per_layer=False).norms
        return (-norms.double().square()).to(torch.float64 if norms.dtype == torch.float64 else torch.float32)

    def score_features(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if self.layers != "head":
            raise NotImplementedError(
                f"{type(self).__name__}(layers='network') needs the inputs: use score(inputs), or layers='head' "
                "for the closed form of the head from logits and features"
            )
        return head_grad_uncertainty(logits, features, self._bias_weight())

    def layer_norms(self, inputs: Inputs) -> Tuple[torch.Tensor, Tuple[str, ...]]:
        """(‖∇_{θ_l} L‖² per sample and layer [B, L], the layer names): the representation the
        paper's classifier takes. layers="head": one column, the head's."""
        if self.layers == "head":
            logits, features = self.forward_features(inputs)
            column = -head_grad_uncertainty(logits, features, self._bias_weight())
            name = self.head_name if isinstance(self.head_name, str) else "+".join(self.head_name or ())
            return column[:, None], (name,)
        result = self._network(inputs, per_layer=True)
        assert result.per_layer is not None
        return result.per_layer, result.layer_names

    def _network(self, inputs: Inputs, per_layer: bool) -> PerSampleGradNorms:
        with eval_mode(self.model):
            return persample_grad_norms(
                self.model,
                inputs,
                confounding_loss,
                params=self.params,
                per_layer=per_layer,
                functional_params=self.functional_params,
                fallback=self.fallback,
                logits=self.logits_fn,
                verify=self.verify,
            )

    def _bias_weight(self) -> float:
        """β of the head's closed form: 1 for a head with a bias; for two averaged heads each bias
        gets δ/2, so β = (number of biases) / 4."""
        if self._head is None:
            raise RuntimeError(f"{type(self).__name__}: the head is found on the first forward pass; score first")
        modules = [self.model.get_submodule(name) for name in self._head.names]
        biases = sum(getattr(module, "bias", None) is not None for module in modules)
        return biases / len(modules) ** 2
