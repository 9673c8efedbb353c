"""ODIN (Liang et al. 2018): max_j softmax(f(x̃) / T)_j at the perturbed input

    x̃ = x − ε · sign(∇_x CE(f(x) / T, ŷ)),   sign(0) = +1,

with T = 1000, ε = 0.0014 by default. eps_space="input" perturbs the tensor as
given; eps_space="pixel" divides the sign by the per-channel normalisation
`std`, as the official code does (ε in pixel units). ID-high.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from gradood import scores
from gradood._checks import check_choice, check_positive
from gradood.detectors._base import Detector, eval_mode

Std = Union[None, float, Sequence[float], torch.Tensor]


def check_perturbation(where: str, temperature: float, epsilon: float, eps_space: str, std: Std) -> None:
    check_positive(where, "temperature", temperature)
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or epsilon < 0:
        raise ValueError(f"{where}: epsilon must be a real number >= 0, got {epsilon!r}")
    check_choice(where, "eps_space", eps_space, ("input", "pixel"))
    if eps_space == "pixel" and std is None:
        raise ValueError(f"{where}: eps_space='pixel' needs std, the per-channel normalisation std")


def odin_perturbation(
    model: nn.Module, inputs: torch.Tensor, temperature: float, epsilon: float, eps_space: str, std: Std
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x̃, ŷ): the ODIN-perturbed inputs and the labels predicted on the original
    inputs. The gradient is taken w.r.t. the inputs only: no `.grad` is written."""
    x = inputs.detach().clone().requires_grad_()
    with torch.enable_grad(), eval_mode(model):
        logits = model(x)
        predicted = logits.argmax(dim=1)
        loss = F.cross_entropy(logits / temperature, predicted, reduction="sum")  # per-sample terms add
        (grad,) = torch.autograd.grad(loss, x)
    step = torch.where(grad >= 0, 1.0, -1.0).to(inputs.dtype)
    if eps_space == "pixel":
        scale = torch.as_tensor(std, dtype=inputs.dtype, device=inputs.device).reshape(1, -1, *([1] * (inputs.dim() - 2)))
        step = step / scale
    return (inputs - epsilon * step).detach(), predicted.detach()


class ODIN(Detector):
    uses_features = False

    def __init__(
        self,
        model: nn.Module,
        temperature: float = 1000.0,
        epsilon: float = 0.0014,
        eps_space: str = "input",
        std: Std = None,
        head: Optional[str] = None,
    ):
        super().__init__(model, head)
        check_perturbation(type(self).__name__, temperature, epsilon, eps_space, std)
        self.temperature, self.epsilon, self.eps_space, self.std = temperature, epsilon, eps_space, std

    def score(self, inputs: torch.Tensor) -> torch.Tensor:
        perturbed = inputs
        if self.epsilon > 0:
            perturbed, _ = odin_perturbation(self.model, inputs, self.temperature, self.epsilon, self.eps_space, self.std)
        logits, _ = self.forward_features(perturbed)
        return scores.msp(logits, self.temperature)
