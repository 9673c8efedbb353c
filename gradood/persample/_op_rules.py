"""Norm rules at the op level: F.batch_norm (eval statistics), F.group_norm,
F.layer_norm and F.rms_norm called with a direct parameter itself as weight or
bias, wherever the call is (timm's BatchNormAct2d, GroupNormAct, LayerNorm2d, a
model's own norm class). Per sample, dγ = Σ g ⊙ x̂ and dβ = Σ g over that
sample's positions (gradood::norm_affine_grads), from the op's input and the
gradient of its output: no replay, no per-sample Jacobian. Other calls (batch
statistics, a weight derived from a parameter such as Gemma's 1 + w, a batch not
in dimension 0) take the generic per-op VJP (gradood/persample/_direct.py).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from gradood.persample.norm import group_norm_statistics, layer_norm_statistics

Statistics = Callable[[torch.Tensor], Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]]


def _batch_norm(arguments) -> Optional[Statistics]:
    if arguments.get("training", False) or arguments.get("running_mean") is None:
        return None  # batch statistics mix the samples: the generic path (and the single-sample check) decide
    mean, variance, eps = arguments["running_mean"], arguments["running_var"], arguments.get("eps", 1e-5)

    def statistics(x):  # x [B, C, T]
        return (
            x,
            mean.to(x.dtype)[None, :, None].expand_as(x),
            torch.rsqrt(variance.to(x.dtype) + eps)[None, :, None].expand_as(x),
        )

    return statistics


def _group_norm(arguments) -> Statistics:
    groups, eps = arguments["num_groups"], arguments.get("eps", 1e-5)

    def statistics(x):
        return (x, *group_norm_statistics(x, groups, eps))

    return statistics


def _last_dims(centred: bool):
    def rule(arguments) -> Statistics:
        eps = arguments.get("eps")
        features = math.prod(arguments["normalized_shape"])

        def statistics(inputs):  # the last dims as channels: [B, C, T] with T every position
            x = inputs.reshape(inputs.shape[0], -1, features).transpose(1, 2)
            if centred:
                mean, inv_std = layer_norm_statistics(inputs, features, 1e-5 if eps is None else eps)
                return x, mean.expand_as(x), inv_std.expand_as(x)
            epsilon = torch.finfo(x.dtype).eps if eps is None else eps
            return x, None, torch.rsqrt(x.square().mean(1, keepdim=True) + epsilon).expand_as(x)

        return statistics

    return rule


#: name -> (the functional op or None where this torch lacks it, its statistics, channels first)
_RULES: Dict[str, Tuple[Optional[Callable[..., torch.Tensor]], Callable, bool]] = {
    "batch_norm": (F.batch_norm, _batch_norm, True),
    "group_norm": (F.group_norm, _group_norm, True),
    "layer_norm": (F.layer_norm, _last_dims(True), False),
    "rms_norm": (getattr(F, "rms_norm", None), _last_dims(False), False),
}
_SIGNATURES: Dict[str, inspect.Signature] = {}


def norm_cotangents(name: str, args: tuple, kwargs: dict, leaves: list, step) -> Optional[Callable]:
    """For a norm op whose weight/bias are direct parameters themselves and whose
    input holds the batch in dimension 0: grad -> [(proxy, dγ or dβ [B, *shape],
    sources)]; None otherwise."""
    entry = _RULES.get(name)
    if entry is None:
        return None
    function, make, channels_first = entry
    if function is None:  # F.rms_norm on a torch without it
        return None
    signature = _SIGNATURES.setdefault(name, inspect.signature(function))
    try:
        arguments = signature.bind(*args, **kwargs).arguments
    except TypeError:
        return None
    x = arguments.get("input")
    positions = {id(leaf): i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)}
    if (
        not isinstance(x, torch.Tensor)
        or step.kinds[positions.get(id(x), -1)] != "batch"
        or step.dims[positions[id(x)]] != 0
    ):
        return None
    fold = step.folds[positions[id(x)]] if step.folds else 1  # k rows per sample: their sums
    wanted: List[Tuple[str, torch.Tensor, frozenset]] = []
    for role in ("weight", "bias"):
        tensor = arguments.get(role)
        if not isinstance(tensor, torch.Tensor):
            continue
        index = positions.get(id(tensor))
        if index is None:
            continue
        if step.kinds[index] == "derived":
            return None  # a weight computed from a parameter: the generic path
        if step.kinds[index] == "param":
            wanted.append((role, tensor, step.sources[index]))
    statistics = make(arguments)
    if statistics is None or not wanted:
        return None
    saved = x.detach()

    def cotangents(grad: torch.Tensor):
        batch = saved.shape[0]
        if channels_first:
            inputs, g = saved.reshape(batch, saved.shape[1], -1), grad.reshape(batch, grad.shape[1], -1)
            inputs, shift, scale = statistics(inputs)
        else:
            inputs, shift, scale = statistics(saved)
            g = grad.reshape(batch, -1, inputs.shape[1]).transpose(1, 2)
        d_weight, d_bias = torch.ops.gradood.norm_affine_grads(g, inputs, shift, scale)
        samples = batch // fold
        per_role = {
            "weight": d_weight.reshape(samples, fold, -1).sum(1),
            "bias": d_bias.reshape(samples, fold, -1).sum(1),
        }
        return [(tensor, per_role[role].reshape(samples, *tensor.shape), sources) for role, tensor, sources in wanted]

    return cotangents
