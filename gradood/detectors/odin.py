"""ODIN (Liang et al. 2018): max_j softmax(f(x̃) / T)_j at the perturbed input

    x̃ = x − ε · sign(∇_x CE(f(x) / T, ŷ)),   sign(0) = +1,

with T = 1000, ε = 0.0014 by default. eps_space="input" perturbs the tensor as
given; eps_space="pixel" divides the sign by the per-channel normalisation
`std`, as the official code does (ε in pixel units). ID-high.

For mapping inputs (keyword arguments), `perturb` names the entries x̃ perturbs;
by default the one floating-point entry (a Hugging Face image model's
`pixel_values`). Integer inputs (token ids) cannot be perturbed: ε > 0 on them is
an error.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from gradood import model_io, scores
from gradood._checks import check_choice, check_positive
from gradood.detectors._base import Detector, eval_mode
from gradood.detectors._head import HeadName
from gradood.model_io import Inputs, LogitsFn
from gradood.persample._workarounds import batch_norm_gradient_layout

Std = Union[None, float, Sequence[float], torch.Tensor]


def check_perturbation(where: str, temperature: float, epsilon: float, eps_space: str, std: Std) -> None:
    check_positive(where, "temperature", temperature)
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"{where}: epsilon must be a finite real number >= 0, got {epsilon!r}")
    check_choice(where, "eps_space", eps_space, ("input", "pixel"))
    if eps_space == "pixel" and std is None:
        raise ValueError(f"{where}: eps_space='pixel' needs std, the per-channel normalisation std")
    if std is not None:
        values = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
        if values.numel() == 0 or not bool(torch.isfinite(values).all()) or not bool((values > 0).all()):
            raise ValueError(f"{where}: std must hold finite values > 0 (one per channel), got {std!r}")


def _check_std_channels(where: str, std: Std, tensor: torch.Tensor) -> None:
    count = torch.as_tensor(std).numel()
    if count != 1 and (tensor.dim() < 2 or tensor.shape[1] != count):
        raise ValueError(
            f"{where}: std has {count} values but the input has {tensor.shape[1] if tensor.dim() > 1 else 0} "
            f"channels (dimension 1 of shape {tuple(tensor.shape)})"
        )


def perturbed_entries(where: str, inputs: Inputs, perturb: Optional[Sequence[str]]) -> Tuple[str, ...]:
    """The names of the inputs ODIN's step perturbs ("" for a tensor)."""
    if isinstance(inputs, torch.Tensor):
        if not inputs.is_floating_point():
            raise ValueError(
                f"{where}: epsilon > 0 perturbs the inputs, which must be floating-point, got {inputs.dtype}"
            )
        return ("",)
    floats = [key for key, value in model_io.tensors(inputs).items() if value.is_floating_point()]
    if perturb is not None:
        names = (perturb,) if isinstance(perturb, str) else tuple(perturb)
        wrong = [name for name in names if name not in floats]
        if wrong or not names:
            raise ValueError(
                f"{where}: perturb={perturb!r} must name floating-point tensors of the inputs "
                f"(floating-point entries: {floats})"
            )
        return names
    if len(floats) != 1:
        raise ValueError(
            f"{where}: epsilon > 0 perturbs one floating-point input, and these inputs have "
            f"{len(floats)} ({floats}): name them with perturb=[...]"
            + ("; token ids cannot be perturbed, use epsilon=0" if not floats else "")
        )
    return (floats[0],)


def odin_perturbation(
    model: nn.Module,
    inputs: Inputs,
    temperature: float,
    epsilon: float,
    eps_space: str,
    std: Std,
    logits: LogitsFn = None,
    perturb: Optional[Sequence[str]] = None,
    where: str = "ODIN",
) -> Tuple[Inputs, torch.Tensor]:
    """(x̃, ŷ): the ODIN-perturbed inputs and the labels predicted on the original
    inputs. The gradient is taken w.r.t. the inputs only: no `.grad` is written."""
    batch = model_io.check_inputs(where, inputs)
    names = perturbed_entries(where, inputs, perturb)
    entries = model_io.tensors(inputs)
    leaves = {name: entries[name].detach().clone().requires_grad_() for name in names}
    x = leaves[""] if isinstance(inputs, torch.Tensor) else {**inputs, **leaves}
    with torch.enable_grad(), eval_mode(model), batch_norm_gradient_layout(model):
        output_logits = model_io.checked_logits(where, model_io.call(model, x), batch, logits)
        predicted = output_logits.argmax(dim=1)
        loss = F.cross_entropy(output_logits / temperature, predicted, reduction="sum")  # per-sample terms add
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    perturbed = {}
    for (name, leaf), grad in zip(leaves.items(), grads):
        original = entries[name]
        grad = torch.zeros_like(leaf) if grad is None else grad
        step = torch.where(grad >= 0, 1.0, -1.0).to(original.dtype)
        if eps_space == "pixel":
            _check_std_channels(where, std, original)
            shape = (1, -1, *([1] * (original.dim() - 2)))
            step = step / torch.as_tensor(std, dtype=original.dtype, device=original.device).reshape(shape)
        perturbed[name] = (original - epsilon * step).detach()
    if isinstance(inputs, torch.Tensor):
        return perturbed[""], predicted.detach()
    return {**inputs, **perturbed}, predicted.detach()


class ODIN(Detector):
    uses_features = False

    def __init__(
        self,
        model: nn.Module,
        temperature: float = 1000.0,
        epsilon: float = 0.0014,
        eps_space: str = "input",
        std: Std = None,
        perturb: Optional[Sequence[str]] = None,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        check_perturbation(type(self).__name__, temperature, epsilon, eps_space, std)
        self.temperature, self.epsilon, self.eps_space, self.std = temperature, epsilon, eps_space, std
        self.perturb = perturb

    def score(self, inputs: Inputs) -> torch.Tensor:
        perturbed = inputs
        if self.epsilon > 0:
            perturbed, _ = odin_perturbation(
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
        logits, _ = self.forward_features(perturbed)
        return scores.msp(logits, self.temperature)
