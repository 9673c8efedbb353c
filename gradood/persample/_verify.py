"""The single-sample check of a layout: once per model and input signature (with
the layout probe), the engine's per-sample results for a probe batch of up to 3
of the given samples are compared with plain autograd run on each of those
samples alone.

It catches, in one comparison, whatever makes a layer's rows not its samples or
a rule not the layer's derivative: a model that mixes samples (statistics over
the batch), reorders them inside its forward, a forward hook of the user's that
replaces a layer's output, a module whose forward differs from what its rule
assumes, a meeting op whose rows depend on other samples. The loss is a fixed
random linear function of the logits (seeded), so no softmax saturation hides a
layer. The check runs on a float64 copy of the model (for models up to 2^27
parameters that deepcopy and run in float64; others in their own dtype), so the round-off of a
badly conditioned float32 or half model is not taken for an error. A layer fails when its squared norm is off by more than rtol of its own
value plus atol of the sample's whole squared norm: (rtol, atol) = (1e-7, 1e-7)
in float64, (1e-3, 1e-4) in float32, (5e-2, 1e-2) in half precision. The atol
term is the round-off of models whose conditioning amplifies it (a LayerNorm over
one feature multiplies it by 1/√eps) in layers too small to move the norm.

What it does not catch: behaviour that depends on the data and does not show on
the probe samples (a branch taken only for other inputs). `verify=False` skips
the check (for a model already checked, or a benchmark of the pass alone).
"""

from __future__ import annotations

import random
from copy import deepcopy
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn

from gradood import model_io
from gradood.persample._caches import empty_tensor_caches
from gradood.persample._workarounds import batch_norm_gradient_layout

_TOLERANCE = {torch.float64: (1e-7, 1e-7), torch.float32: (1e-3, 1e-4)}
_HALF_TOLERANCE = (5e-2, 1e-2)
PROBE = 3  # samples checked
_COPY_LIMIT = 1 << 27  # parameters: a float64 copy of larger models costs too much memory


class _Projection(Protocol):
    """A per-sample loss of the logits; `first`: the batch's position among the probe samples."""

    def __call__(self, logits: torch.Tensor, first: int = 0) -> torch.Tensor: ...


def _projection(dtype: torch.dtype) -> _Projection:
    """ℓ_i(f) = ⟨r_i, f⟩ for the probe sample at position i (from `first`), each r_i its
    own seeded random vector: a per-sample output gradient that differs between samples,
    so errors that cancel when all samples get the same one (logits centred over the
    batch, a shared table's gradient split evenly between its copies) show."""
    cache: Dict[int, torch.Tensor] = {}

    def loss(logits: torch.Tensor, first: int = 0) -> torch.Tensor:
        count = logits.shape[1]
        if count not in cache:
            generator = torch.Generator().manual_seed(1234 + count)
            cache[count] = torch.randn(PROBE, count, generator=generator, dtype=torch.float64)
        compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
        rows = cache[count][first : first + logits.shape[0]].to(logits.device, compute)
        return (logits.to(compute) * rows).sum(1)

    return loss


def distinct_samples(inputs, limit: int = PROBE) -> torch.Tensor:
    """Indices of up to `limit` samples that differ pairwise in some input tensor (the first
    ones found): identical samples cannot show a model that mixes them."""
    batch = model_io.batch_size(inputs)
    rows = [
        tensor.reshape(batch, -1)
        for tensor in model_io.tensors(inputs).values()
        if tensor.dim() > 0 and tensor.shape[0] == batch
    ]
    kept = [0]
    new = torch.ones(batch, dtype=torch.bool)
    while len(kept) < min(limit, batch):
        differs = torch.zeros(batch, dtype=torch.bool)
        for row in rows:
            differs |= (row != row[kept[-1]]).any(1).cpu()
        new &= differs
        found = torch.nonzero(new)
        if found.numel() == 0:
            break
        kept.append(int(found[0]))
    return torch.tensor(kept)


def _probe_batch(inputs):
    index = distinct_samples(inputs)
    return model_io.select(inputs, index), index.numel()


def single_sample_gradients(
    model: nn.Module, inputs, count: int, names: Sequence[str], logits_fn, loss
) -> List[Dict[str, Optional[torch.Tensor]]]:
    """For each of the first `count` samples alone, the gradient of loss w.r.t. each named
    parameter (None where it gets none); the model's flags restored, no .grad written."""
    parameters = dict(model.named_parameters())
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    out: List[Dict[str, Optional[torch.Tensor]]] = []
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        chosen = [parameters[name] for name in names]
        for parameter in chosen:
            parameter.requires_grad_(True)
        for index in range(count):  # loss(logits, index): the sample's own projection
            sample = model_io.select(inputs, torch.tensor([index]))
            with torch.enable_grad(), empty_tensor_caches(model), batch_norm_gradient_layout(model):
                logits = model_io.checked_logits("the single-sample check", model_io.call(model, sample), 1, logits_fn)
                total = loss(logits, index).sum()
                # A loss that depends on no chosen parameter: zero gradients, nothing to run.
                grads = (
                    torch.autograd.grad(total, chosen, allow_unused=True)
                    if total.requires_grad
                    else (None,) * len(chosen)
                )
            out.append(dict(zip(names, grads)))
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
    return out


def _squared(grad: Optional[torch.Tensor]) -> float:
    """The squared norm of a parameter's gradient in float64; 0 where it got none."""
    return 0.0 if grad is None else float(grad.double().square().sum())


def _tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    return _TOLERANCE.get(dtype, _HALF_TOLERANCE)


class CheckFailed(ValueError):
    """The single-sample check found per-sample gradients that are not the samples' own."""


def _explain(where: str, problems: List[str]) -> ValueError:
    return CheckFailed(
        f"{where}: the single-sample check failed: the per-sample gradients this pass computes for a probe batch "
        f"differ from autograd run on each sample alone, for {'; '.join(problems[:3])}"
        f"{' and more' if len(problems) > 3 else ''}. The model mixes or reorders the samples of a batch (statistics "
        "over the batch dimension, a sort), a forward hook replaces a layer's output, or a module computes something "
        "its rule does not assume. Use model.eval(), remove the hook, or exclude the parameters with `params`; "
        "fallback='torch.func' replays modules without a rule per sample"
    )


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _in_float64(model: nn.Module, batch):
    """(model, batch, dtype) for the check: a float64 copy where that is affordable."""
    dtype = _model_dtype(model)
    if dtype == torch.float64 or sum(p.numel() for p in model.parameters()) > _COPY_LIMIT:
        return model, batch, dtype
    try:
        copy = deepcopy(model).double()
        batch64 = model_io.map_tensors(batch, lambda t: t.double() if t.is_floating_point() else t)
        with torch.no_grad(), empty_tensor_caches(copy):
            model_io.call(copy, batch64)  # an op without float64 kernels (torch._grouped_mm of MoE layers)
    except Exception:  # noqa: BLE001  (or a module that does not deepcopy, e.g. old-style weight_norm)
        return model, batch, dtype
    return copy, batch64, torch.float64


def check_norms(where: str, model: nn.Module, inputs, params, functional_params, fallback, logits_fn, layout) -> None:
    from gradood.persample.engine import persample_grad_norms  # the engine calls this module

    batch, count = _probe_batch(inputs)
    model, batch, dtype = _in_float64(model, batch)
    loss = _projection(dtype)
    ours = persample_grad_norms(
        model,
        batch,
        loss=loss,
        params=params,
        per_layer=True,
        verify=False,
        functional_params=functional_params,
        fallback=fallback,
        logits=logits_fn,
    )
    names = [name for group in ours.parameters for name in group]
    reference = single_sample_gradients(model, batch, count, names, logits_fn, loss)
    rtol, atol = _tolerance(dtype)
    problems = []
    for index, grads in enumerate(reference):
        per_layer = [sum(_squared(grads[n]) for n in group) for group in ours.parameters]
        total = sum(per_layer)
        measured = ours.per_layer
        if measured is None:
            raise RuntimeError(f"{where}: the check asked for per-layer norms and got none")
        for layer, expected in zip(ours.layer_names, per_layer):
            got = float(measured[index, ours.layer_names.index(layer)])
            if abs(got - expected) > rtol * expected + atol * total:
                problems.append(f"{layer or 'the model'} (sample {index}: {got:.6g} against {expected:.6g})")
    if problems:
        raise _explain(where, problems)


def check_gradients(
    where: str, model: nn.Module, inputs, params, functional_params, fallback, logits_fn, layout
) -> None:
    from gradood.persample.engine import persample_gradients

    batch, count = _probe_batch(inputs)
    model, batch, dtype = _in_float64(model, batch)
    loss = _projection(dtype)
    ours = persample_gradients(
        model,
        batch,
        loss=loss,
        params=params,
        functional_params=functional_params,
        fallback=fallback,
        logits=logits_fn,
        verify=False,
    )
    names = list(ours.names)
    reference = single_sample_gradients(model, batch, count, names, logits_fn, loss)
    generator = torch.Generator().manual_seed(4321)
    rtol, atol = _tolerance(dtype)
    problems = []
    totals = [
        sum(float(g.double().square().sum()) for g in grads.values() if g is not None) ** 0.5 for grads in reference
    ]
    for name in names:  # each parameter projected on 3 random directions
        numel = int(torch.Size(ours.shapes[name]).numel())
        directions = {
            other: torch.zeros(3, int(torch.Size(shape).numel()), dtype=torch.float64)
            for other, shape in ours.shapes.items()
        }
        directions[name] = torch.randn(3, numel, generator=generator, dtype=torch.float64)
        compute = ours.logits.dtype if ours.logits.dtype == torch.float64 else torch.float32
        device = ours.logits.device
        got = ours.project({k: v.to(device, compute) for k, v in directions.items()}).double().cpu()
        for index, grads in enumerate(reference):
            grad = grads[name]
            flat = torch.zeros(numel, dtype=torch.float64) if grad is None else grad.detach().double().cpu().reshape(-1)
            expected = directions[name] @ flat
            scale = totals[index] * float(directions[name].norm(dim=1).max())
            if float((got[index] - expected).abs().max()) > rtol * float(expected.abs().max()) + atol * scale:
                problems.append(f"{name} (sample {index})")
    if problems:
        raise _explain(where, problems)


# --- The per-call check (verify=k): k random samples of every call -------------------------

_CALL_SAMPLES = random.Random(0x5EED)  # its own stream: the user's RNG state is left alone


def call_check_count(where: str, verify) -> int:
    """How many samples of each call verify= asks to check against single-sample
    autograd: 0 for True/False (True: the once-per-signature probe check only), k
    for an int k ≥ 1."""
    if isinstance(verify, bool):
        return 0
    if isinstance(verify, int) and verify >= 1:
        return verify
    raise ValueError(
        f"{where}: verify must be True, False or a number of samples k >= 1 to check on every call, got {verify!r}"
    )


def _call_samples(batch: int, count: int) -> List[int]:
    return sorted(_CALL_SAMPLES.sample(range(batch), min(count, batch)))


def _chosen_gradients(
    model: nn.Module,
    inputs,
    chosen: Sequence[int],
    names: Sequence[str],
    logits_fn,
    loss,
    temperature: float,
    targets: Optional[torch.Tensor],
):
    """Plain-autograd gradients of the call's own loss for the samples `chosen` of the
    call, each alone, on one float64 copy of the model (only the pass's round-off counts)."""
    from gradood.persample.losses import per_sample_loss

    subset = model_io.select(inputs, torch.tensor(list(chosen)))
    reference, subset, _ = _in_float64(model, subset)

    def own_loss(logits, position):
        index = chosen[position]
        own = None if targets is None else targets[index : index + 1]
        return per_sample_loss(logits, loss, temperature, own)

    return single_sample_gradients(reference, subset, len(chosen), names, logits_fn, own_loss)


def check_call_norms(
    where: str,
    model: nn.Module,
    inputs,
    loss,
    temperature: float,
    targets: Optional[torch.Tensor],
    logits_fn,
    groups: Sequence[Tuple[str, ...]],
    layer_names: Sequence[str],
    squared: torch.Tensor,
    count: int,
) -> None:
    """Compares the per-layer squared norms `squared` [B, L] of this call with plain
    autograd on `count` random samples of it, each alone (the call's own loss)."""
    batch = squared.shape[0]
    rtol, atol = _tolerance(_model_dtype(model))
    names = [name for group in groups for name in group]
    problems = []
    chosen = _call_samples(batch, count)
    for index, grads in zip(
        chosen, _chosen_gradients(model, inputs, chosen, names, logits_fn, loss, temperature, targets)
    ):
        per_layer = [sum(_squared(grads[n]) for n in group) for group in groups]
        total = sum(per_layer)
        for column, (layer, expected) in enumerate(zip(layer_names, per_layer)):
            got = float(squared[index, column])
            if not abs(got - expected) <= rtol * expected + atol * total:
                problems.append(
                    f"{layer or 'the model'} (sample {index} of the call: {got:.6g} against {expected:.6g})"
                )
    if problems:
        raise _explain_call(where, problems)


def check_call_gradients(
    where: str,
    model: nn.Module,
    inputs,
    loss,
    temperature: float,
    targets: Optional[torch.Tensor],
    logits_fn,
    ours,
    count: int,
) -> None:
    """Compares the per-sample gradients of this call, projected on 3 random directions
    over all selected parameters, with plain autograd on `count` random samples alone."""
    names = list(ours.names)
    generator = torch.Generator().manual_seed(_CALL_SAMPLES.randrange(1 << 31))
    directions = {
        name: torch.randn(3, int(torch.Size(ours.shapes[name]).numel()), generator=generator, dtype=torch.float64)
        for name in names
    }
    compute = ours.logits.dtype if ours.logits.dtype == torch.float64 else torch.float32
    got = ours.project({k: v.to(ours.logits.device, compute) for k, v in directions.items()}).double().cpu()
    rtol, atol = _tolerance(_model_dtype(model))
    length = sum(float(d.square().sum(1).max()) for d in directions.values()) ** 0.5
    problems = []
    chosen = _call_samples(ours.count, count)
    for index, grads in zip(
        chosen, _chosen_gradients(model, inputs, chosen, names, logits_fn, loss, temperature, targets)
    ):
        expected = torch.zeros(3, dtype=torch.float64)
        size = 0.0
        for name in names:
            if grads[name] is not None:
                flat = grads[name].detach().double().cpu().reshape(-1)
                expected += directions[name] @ flat
                size += float(flat.square().sum())
        error = float((got[index] - expected).abs().max())
        if not error <= rtol * float(expected.abs().max()) + atol * size**0.5 * length:
            problems.append(
                f"sample {index} of the call (projections {got[index].tolist()} against {expected.tolist()})"
            )
    if problems:
        raise _explain_call(where, problems)


def _explain_call(where: str, problems: List[str]) -> ValueError:
    return CheckFailed(
        f"{where}: the per-call check (verify=k) failed: the per-sample gradients of this batch differ from autograd "
        f"run on the sample alone, for {'; '.join(problems[:3])}{' and more' if len(problems) > 3 else ''}. The model "
        "behaves differently on these inputs than on the samples the layout was checked on (a data-dependent branch, "
        "samples mixed or reordered only for some batches, a parameter used outside its module's forward only for "
        "some inputs). Exclude the parameters with `params`, or use fallback='torch.func' for the modules concerned"
    )
