"""The classifier head of a model: the layer(s) whose output the logits are, and
the penultimate features the last-layer closed forms need.

Three kinds, each recognised only by exact equality with the model's logits
(never guessed):

- "linear": one nn.Linear (or 1×1 nn.Conv2d) whose output is the logits [B, C];
  the features are its input [B, D].
- "token": a head run on every position of a sequence, [B, T, C], whose logits
  are one position per sample (Hugging Face's GPT-2/Llama-style sequence
  classifiers pick the last non-padding token after the head). The features are
  the head's input at the position whose output row equals the sample's logits.
  A sample for which no position, or several positions with different inputs,
  match is an error.
- "mean": two heads whose outputs are averaged, f = (W₁v₁ + b₁ + W₂v₂ + b₂)/2
  (timm's and Hugging Face's distilled DeiT, LeViT in eval mode). This is one
  linear head with weight W = [W₁ W₂], features v = [v₁; v₂]/2 and bias
  b = (b₁ + b₂)/2: ∇_W ℓ = (∂ℓ/∂f) vᵀ is exactly the joint gradient of both
  heads' weights, so every last-layer closed form of the model is the one of
  that head (the bias terms are those of the single bias b).

A candidate is a module of class nn.Linear, or nn.Conv2d with a 1×1 kernel, or
a subclass of either, and it is accepted only if the affine map of its weight
and bias, recomputed on its captured input, gives its captured output (a cosine
classifier subclassing nn.Linear is refused), and if neither tensor was modified
in place after the call (`logits /= T` after the head would otherwise be taken
for the head's own output). A 1×1 convolution counts only on a 1×1 map.
"""

from __future__ import annotations

import typing
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from gradood._sums import sum_tensors
from gradood.model_io import Call

#: Each candidate's call in one forward pass, by module name.
Captured = Dict[str, Call]
HeadName = Union[str, Tuple[str, str]]

KINDS = ("linear", "token", "mean")

Derived = typing.TypeVar("Derived")


class Head(NamedTuple):
    names: Tuple[str, ...]  # one module, or two for "mean"
    kind: str

    @property
    def name(self) -> Union[str, Tuple[str, ...]]:
        return self.names[0] if len(self.names) == 1 else self.names


def is_candidate(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)


def _rows(call: Call) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(input [N, D], output [N, C]) of a candidate's call as rows, or None if it is
    no affine head: a 1×1 conv on a map larger than 1×1."""
    inputs, output = call.input, call.output
    if isinstance(call.module, nn.Conv2d):
        if inputs.dim() != 4 or inputs.shape[2:] != (1, 1) or output.dim() != 4 or output.shape[2:] != (1, 1):
            return None
        return inputs.flatten(1), output.flatten(1)
    return inputs.reshape(-1, inputs.shape[-1]), output.reshape(-1, output.shape[-1])


def _weight(module: nn.Module) -> torch.Tensor:
    """A head's weight (an nn.Linear's, or a 1×1 nn.Conv2d's)."""
    return typing.cast(torch.Tensor, module.weight)


def _bias(module: nn.Module) -> Optional[torch.Tensor]:
    return typing.cast(Optional[torch.Tensor], module.bias)


def _recomputed(call: Call) -> torch.Tensor:
    """The plain layer's own op on the captured input: F.linear, or nn.Conv2d's convolution."""
    module = call.module
    bias = _bias(module)
    weight, bias = _weight(module).detach(), None if bias is None else bias.detach()
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d._conv_forward(module, call.input.detach(), weight, bias)
    return F.linear(call.input.detach(), weight, bias)


def is_affine(call: Call) -> bool:
    """Whether the call's output is its weight and bias applied to its input (and was not
    modified since): the plain layer's op is run again on the captured input, in the same
    dtype, and must give the captured output to 4 units of round-off of each element's
    products (|x|·|W|ᵀ + |b|, computed only where the two differ at all: usually they are
    bit-identical). A subclass scaling its output by 1.003 is refused at any width. One more
    head-sized product per call (and one for the bound where the results are not identical)."""
    module, output = call.module, call.output.detach()
    rows = _rows(call)
    if not call.untouched or rows is None or getattr(module, "groups", 1) != 1:
        return False
    with torch.no_grad():
        try:
            again = _recomputed(call)
        except RuntimeError:  # shapes the plain op does not take
            return False
        if again.shape != output.shape:
            return False
        if bool(((again == output) | (again.isnan() & output.isnan())).all()):
            return True  # bit-identical (the usual case)
        compute = torch.float64 if output.dtype == torch.float64 else torch.float32
        inputs, captured = rows
        again = again.reshape(captured.shape).to(compute)
        captured = captured.detach().to(compute)
        head_weight, head_bias = _weight(module), _bias(module)
        weight = head_weight.detach().reshape(head_weight.shape[0], -1).to(compute)
        bound = inputs.detach().to(compute).abs() @ weight.abs().t()
        if head_bias is not None:
            bound = bound + head_bias.detach().to(compute).abs()
        close = (again - captured).abs() <= 4 * torch.finfo(output.dtype).eps * bound + torch.finfo(compute).tiny
        same = (again == captured) | (again.isnan() & captured.isnan())  # non-finite entries: equal, or NaN both
        return bool(torch.where(torch.isfinite(again) & torch.isfinite(captured), close, same).all())


def _flat_output(call: Call, logits: torch.Tensor) -> Optional[torch.Tensor]:
    """A candidate's output as [B, C]: a Linear's [B, C], a 1×1 conv's [B, C, 1, 1]."""
    output = call.output
    if output.dtype != logits.dtype or output.shape[0] != logits.shape[0]:
        return None
    if output.shape == logits.shape or (output.dim() == 4 and output.shape[1:] == (logits.shape[1], 1, 1)):
        return output.reshape(logits.shape)
    return None


def _token_positions(output: torch.Tensor, logits: torch.Tensor) -> Optional[torch.Tensor]:
    """For a [B, T, C] output: per sample, the positions whose row equals the logits ([B, T] bool), or None."""
    if (
        output.dim() != 3
        or output.shape[0] != logits.shape[0]
        or output.shape[2] != logits.shape[1]
        or output.dtype != logits.dtype
    ):
        return None
    expected = logits[:, None, :]
    matches = ((output == expected) | (output.isnan() & expected.isnan())).all(2)
    return matches if bool(matches.any(1).all()) else None


def produces(head: Head, captured: Captured, logits: torch.Tensor) -> bool:
    """Whether these head modules, each an affine map of its input, produced exactly
    these logits in this pass."""
    if any(name not in captured for name in head.names):
        return False
    if head.kind == "token":
        equal = _token_positions(captured[head.names[0]].output, logits) is not None
    else:
        outputs = [_flat_output(captured[name], logits) for name in head.names]
        present = [output for output in outputs if output is not None]
        equal = len(present) == len(outputs) and _same(
            present[0] if head.kind == "linear" else (present[0] + present[1]) / 2, logits
        )
    # The comparison with the logits first: the recomputation of the head is the costly check.
    return equal and all(is_affine(captured[name]) for name in head.names)


def kind_of(names: Sequence[str], captured: Captured, logits: torch.Tensor) -> Optional[str]:
    """The kind of head these named modules form in this pass, or None."""
    kinds = ("mean",) if len(names) == 2 else ("linear", "token")
    for kind in kinds:
        if produces(Head(tuple(names), kind), captured, logits):
            return kind
    return None


def find(captured: Captured, logits: torch.Tensor) -> Optional[Head]:
    """The last candidate whose output is the logits; else the last one run on every
    token whose output holds each sample's logits; else a pair of candidates whose
    mean is the logits. None if none of these."""
    names = list(captured)
    for kind in ("linear", "token"):
        for name in reversed(names):
            if produces(Head((name,), kind), captured, logits):
                return Head((name,), kind)
    shaped = [name for name in names if _flat_output(captured[name], logits) is not None]
    for second in reversed(range(len(shaped))):
        for first in reversed(range(second)):
            pair = Head((shaped[first], shaped[second]), "mean")
            if produces(pair, captured, logits):
                return pair
    return None


def features(where: str, head: Head, captured: Captured, logits: torch.Tensor) -> torch.Tensor:
    """The penultimate features [B, D] of a head that `produces` has accepted in this pass
    (see the module docstring)."""
    if head.kind == "linear":
        inputs = captured[head.names[0]].input
        return inputs.reshape(inputs.shape[0], -1)
    if head.kind == "mean":
        first, second = (captured[name].input for name in head.names)
        return torch.cat([first.reshape(first.shape[0], -1), second.reshape(second.shape[0], -1)], 1) / 2
    inputs, output = captured[head.names[0]].input, captured[head.names[0]].output
    matches = _token_positions(output, logits)
    if matches is None:
        raise ValueError(
            f"{where}: head {head.names[0]!r} is run on every token, but for some sample no token's "
            "output equals the logits"
        )
    position = matches.to(torch.int64).argmax(1)  # the first matching token
    picked = inputs[torch.arange(inputs.shape[0], device=inputs.device), position.to(inputs.device)]
    several = matches.sum(1) > 1
    if bool(several.any()):  # tokens with equal outputs must have equal inputs, or the features are ambiguous
        for sample in several.nonzero().flatten().tolist():
            rows = inputs[sample, matches[sample].to(inputs.device)]
            if not bool((rows == rows[:1]).all()):
                raise ValueError(
                    f"{where}: head {head.names[0]!r} is run on every token, and in sample {sample} several tokens "
                    "with different inputs give the logits, so the pooled token is ambiguous; pass a model that "
                    "returns the pooled token's logits from a head applied to it"
                )
    return picked


def weight_bias(model: nn.Module, head: Head) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(W [C, D], b [C] or None) of the (equivalent single) head."""
    modules = [model.get_submodule(name) for name in head.names]
    weights = [_weight(m).detach().reshape(_weight(m).shape[0], -1) for m in modules]
    biases = [None if _bias(m) is None else typing.cast(torch.Tensor, _bias(m)).detach() for m in modules]
    if head.kind != "mean":
        return weights[0], biases[0]
    present = [b for b in biases if b is not None]
    bias = None if not present else sum_tensors(present) / 2
    return torch.cat(weights, 1), bias


def derived_from_weight(
    owner: object, name: str, weight: torch.Tensor, build: Callable[[], Derived], *extra: object
) -> Derived:
    """What `build` derives from the head's weight (DICE's sparsified head, ASH's blocked Wᵀ),
    kept in owner.__dict__[name] and rebuilt only when the weight or `extra` changed.

    The weight arrives as a new detached view on every call, so it is recognised by its memory
    (data pointer, shape, strides, dtype, device) and its in-place version (shared by every view
    of the parameter); the cache holds that view, so the memory cannot be freed and reused by
    another tensor while it is cached. A parameter replaced, or changed in place by an op (an
    optimiser step, load_state_dict), rebuilds it; a write through `.data`, which autograd's
    version counter does not see either, does not. Tensors among `extra` count by identity and
    version (the cache holds them)."""
    if weight.is_inference() or any(isinstance(item, torch.Tensor) and item.is_inference() for item in extra):
        return build()  # inference tensors have no version counter: nothing to key a cache on
    key: Tuple[object, ...] = (
        weight.data_ptr(),
        tuple(weight.shape),
        weight.stride(),
        weight.dtype,
        weight.device,
        weight._version,
    )
    # Tensors among `extra` (DICE's mask) by identity and version: the cache holds them too.
    key += tuple((id(item), item._version) if isinstance(item, torch.Tensor) else item for item in extra)
    cached = owner.__dict__.get(name)
    if cached is None or cached[2] != key:
        cached = (weight, extra, key, build())
        owner.__dict__[name] = cached
    return cached[3]
