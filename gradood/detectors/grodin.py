"""GRODIN
("GRODIN: Improved Large-Scale Out-of-Domain Detection via Back-propagation" (anonymous, ICLR 2022 submission, OpenReview)):
the full-network gradient of ℓ = CE(f(x̃)/T, ŷ)
factors as ∇_θ ℓ = (1/T) · p_ŷ · G. Scores, both at the ODIN-perturbed input x̃
(same ε, T, eps_space as ODIN), negated (the norms are OOD-high):

    part="SG":  −‖∇_θ ℓ‖₂            (the official code's score)
    part="G":   −‖∇_θ ℓ‖₂ / p_ŷ       (T factor dropped)

ŷ is re-predicted on x̃ before the gradient step (repredict=True, as the
official code), or kept from x. All parameters count (or those selected by
`params`); the norms come from gradood.persample_grad_norms in one forward and
one backward pass (functional_params="broadcast" for a ViT's class token and
position embedding, fallback="torch.func" for modules without a rule; see there).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from gradood._checks import check_choice
from gradood.detectors._base import Detector, eval_mode
from gradood.detectors._head import HeadName
from gradood.detectors.odin import Std, check_perturbation, odin_perturbation
from gradood.model_io import Inputs, LogitsFn
from gradood.persample import _verify, persample_grad_norms
from gradood.persample.engine import ParamSelector


class GRODIN(Detector):
    def __init__(
        self,
        model: nn.Module,
        temperature: float = 1.0,
        epsilon: float = 0.0,
        part: str = "SG",
        eps_space: str = "input",
        std: Std = None,
        repredict: bool = True,
        params: ParamSelector = None,
        functional_params: Optional[str] = None,
        fallback: Optional[str] = None,
        perturb: Optional[Sequence[str]] = None,
        verify: Union[bool, int] = True,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        _verify.call_check_count(type(self).__name__, verify)  # a bad value fails here, not at score time
        self.verify = verify
        check_perturbation(type(self).__name__, temperature, epsilon, eps_space, std)
        self.part = check_choice(type(self).__name__, "part", part, ("SG", "G"))
        self.temperature, self.epsilon, self.eps_space, self.std = temperature, epsilon, eps_space, std
        self.repredict, self.params, self.functional_params = repredict, params, functional_params
        self.fallback, self.perturb = fallback, perturb

    def score(self, inputs: Inputs) -> torch.Tensor:
        perturbed, original_labels = inputs, None
        if self.epsilon > 0:
            perturbed, original_labels = odin_perturbation(
                self.model,
                inputs,
                self.temperature,
                self.epsilon,
                self.eps_space,
                self.std,
                self.logits_fn,
                self.perturb,
                type(self).__name__,
            )
        # Without a perturbation the re-predicted label is the original one.
        with eval_mode(self.model):
            if original_labels is not None and not self.repredict:
                result = persample_grad_norms(
                    self.model,
                    perturbed,
                    "ce",
                    self.temperature,
                    targets=original_labels,
                    params=self.params,
                    functional_params=self.functional_params,
                    fallback=self.fallback,
                    logits=self.logits_fn,
                    verify=self.verify,
                )
                labels = original_labels
            else:
                result = persample_grad_norms(
                    self.model,
                    perturbed,
                    "ce_pred",
                    self.temperature,
                    params=self.params,
                    functional_params=self.functional_params,
                    fallback=self.fallback,
                    logits=self.logits_fn,
                    verify=self.verify,
                )
                labels = result.logits.argmax(dim=1)
        if self.part == "SG":
            return -result.norms
        label_prob = torch.softmax(result.logits / self.temperature, dim=1).gather(1, labels[:, None]).squeeze(1)
        return -result.norms / label_prob
