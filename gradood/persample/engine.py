"""Full-network per-sample gradient norms from one forward and one backward pass.

‖∇_θ ℓ(x_i)‖₂ for every sample, without a per-sample loop, without per-sample
gradients beyond a bounded chunk of one layer, and without the summed weight
gradient: parameters are frozen for the pass, so the backward runs only the
input-gradient chain from the first hooked layer on; each layer's norm comes
from its input and output gradient through the rule registered for its class
(gradood.persample.{linear,conv,norm,embedding,attention}). Layers combine by
Pythagoras: s_i² = Σ_layers ‖∇_{θ_l} ℓ_i‖².
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from gradood import model_io
from gradood._checks import check_positive
from gradood.model_io import Inputs, LogitsFn
from gradood.persample import _layout, _verify, attention, conv, embedding, linear, norm, std_conv, transformers_conv1d  # noqa: F401  (rules)
from gradood.persample._caches import empty_tensor_caches
from gradood.persample._consume import DIRECT_EMBEDDING, DIRECT_LINEAR, EmbeddingCall, layer_gradients, layer_norms
from gradood.persample._direct import LayoutChanged, PassTracker, Source
from gradood.persample._direct_grads import DirectGradients, contributions
from gradood.persample._grads import DenseLayerGradients, LayerGradients
from gradood.persample._layout import probe_layout
from gradood.persample._outside_use import watch_outside_uses
from gradood.persample._recorder import Recorder, record_output, record_piece, record_single_input
from gradood.persample._rules import CompositeRule, rule_for
from gradood.persample._workarounds import batch_norm_gradient_layout
from gradood.persample.fallback import torch_func_rule
from gradood.persample.losses import LOSSES, Loss, per_sample_loss

ParamSelector = Union[None, Iterable[str], Callable[[str, nn.Parameter], bool]]

_WHERE = "gradood.persample_grad_norms"


class PerSampleGradNorms(NamedTuple):
    """norms [B]: L2 norm over the selected parameters; logits [B, C] of the same
    forward (detached); per_layer [B, L] squared norms per layer (when asked),
    with layer_names and the method of each layer's weight ("ghost",
    "materialise", "direct", or "autograd" for a batch of one sample)."""

    norms: torch.Tensor
    logits: torch.Tensor
    per_layer: Optional[torch.Tensor]
    layer_names: Tuple[str, ...]
    methods: Tuple[str, ...]
    parameters: Tuple[Tuple[str, ...], ...] = ()  # the full names of each layer's parameters


class _Functional(NamedTuple):
    """A parameter its module uses directly in forward (a ViT's class token or
    position embedding), handled by batch broadcast substitution."""

    name: str
    module: nn.Module
    short_name: str
    parameter: nn.Parameter


def _value_rows(flat: torch.Tensor, start: int, end: int) -> Dict[str, torch.Tensor]:
    """Samples start..end of a materialised per-sample gradient [B, numel]."""
    return {"value": flat[start:end]}


class _Layer(NamedTuple):
    name: str
    module: Any  # an nn.Module, or the EmbeddingCall of a directly handled embedding
    parameter_names: Tuple[str, ...]  # the module's own names of its selected parameters
    rule: object  # a rule function, a CompositeRule, or the torch.func fallback


def _refuse_sample_mixing(model: nn.Module, where: str) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training or module.running_mean is None:
                raise ValueError(
                    f"{where}: {name or 'the model'} ({type(module).__name__}) normalises with batch statistics "
                    "(train mode, or no running statistics), which mixes the samples of a batch: "
                    "call model.eval() first"
                )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training:
            raise ValueError(f"{where}: {name} ({type(module).__name__}) is in train mode: call model.eval() first")
        if isinstance(module, nn.MultiheadAttention) and module.training and module.dropout > 0:
            raise ValueError(
                f"{where}: {name} (MultiheadAttention) applies dropout in train mode: call model.eval() first"
            )


def _select(model: nn.Module, params: ParamSelector, where: str) -> Dict[str, nn.Parameter]:
    """The parameters θ of the norm: all of them by default, whatever their
    requires_grad flag (the papers' full-network gradient; freezing a backbone for
    inference does not change the score); "trainable" for those with requires_grad;
    names; or a predicate (name, parameter) -> bool over all of them."""
    named = dict(model.named_parameters())
    if params is None:
        selected = named
    elif isinstance(params, str) and params == "trainable":
        selected = {name: p for name, p in named.items() if p.requires_grad}
    elif callable(params):
        selected = {name: p for name, p in named.items() if params(name, p)}
    else:
        names = [params] if isinstance(params, str) else list(params)
        unknown = [name for name in names if name not in named]
        if unknown:
            raise ValueError(f"{where}: params names unknown parameters: {unknown}")
        selected = {name: named[name] for name in names}
    if not selected:
        raise ValueError(f"{where}: no parameter is selected (params={params!r})")
    return selected


def _layers(
    model: nn.Module, selected: Dict[str, nn.Parameter], functional_params: Optional[str], where: str
) -> Tuple[List[_Layer], List[_Functional], List[Source]]:
    """The hooked layers (modules with a rule, for their selected parameters), the
    broadcast-substituted parameters (functional_params="broadcast"), and the direct
    parameters: those of modules without a rule, of modules whose parameters a hook
    or parametrisation changes (old-style weight_norm), and those two modules share."""
    owners: Dict[int, List[Tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for short_name, parameter in module._parameters.items():
            if parameter is not None:
                uses = owners.setdefault(id(parameter), [])
                if all(owner[1] is not module for owner in uses):
                    uses.append((module_name, module, short_name))
    for module_name, module in model.named_modules():
        if isinstance(rule_for(module), CompositeRule):  # e.g. MultiheadAttention's out_proj
            for short_name, parameter in module.named_parameters():
                owners[id(parameter)] = [(module_name, module, short_name)]
    by_module: Dict[int, _Layer] = {}
    functional: List[_Functional] = []
    sources: List[Source] = []
    for full_name, parameter in selected.items():
        module_name, module, short_name = owners[id(parameter)][0]
        rule = rule_for(module)
        known = getattr(rule, "parameters", ("weight", "bias"))
        unknown = [name for name in module._parameters if name not in known]
        if rule is not None and not isinstance(rule, CompositeRule) and unknown:  # e.g. torch.nn.utils.weight_norm
            rule = None
        if len(owners[id(parameter)]) > 1:  # shared by two modules: every use op by op
            rule = None
        if rule is None:
            if functional_params == "broadcast" and parameter.dim() >= 1 and parameter.shape[0] == 1:
                functional.append(_Functional(full_name, module, short_name, parameter))
            else:
                sources.append(Source(full_name, module_name, module, short_name, parameter))
            continue
        layer = by_module.get(id(module))
        names = (layer.parameter_names if layer else ()) + (short_name,)
        by_module[id(module)] = _Layer(module_name, module, names, rule)
    return list(by_module.values()), functional, sources


def _apply_layout(
    model: nn.Module, layers: List[_Layer], sources: List[Source], layout
) -> Tuple[List[_Layer], List[Source]]:
    """The layers and direct parameters of the pass: direct layers' parameters join the
    direct ones, hosts take over handed-over layers, and the modules of parameters the
    layout replays with torch.func become torch.func layers."""
    modules = dict(model.named_modules())
    sources = list(sources)
    kept = []
    for layer in layers:
        if layer.name not in layout.direct_layers:
            kept.append(layer)
            continue
        for own in layer.parameter_names:
            full = f"{layer.name}.{own}" if layer.name else own
            sources.append(Source(full, layer.name, layer.module, own, layer.module.get_parameter(own)))
    layers = _hand_over(model, kept, layout.hosts)
    if layout.replayed:
        by_name = {layer.name: layer for layer in layers}
        for module_name, names in layout.replayed.items():
            current = by_name.get(module_name)
            replayed = (current.parameter_names if current else ()) + tuple(names)
            by_name[module_name] = _Layer(module_name, modules[module_name], replayed, torch_func_rule)
        layers = list(by_name.values())
    return layers, [source for source in sources if source.name in layout.direct]


def _hand_over(model: nn.Module, layers: List[_Layer], hosts: Dict[str, str]) -> List[_Layer]:
    """The layers with each handed-over layer's parameters moved to its host, a
    module replayed by the torch.func fallback (created where it was no layer),
    which takes the place of the first layer it receives."""
    if not hosts:
        return layers
    modules = dict(model.named_modules())
    by_name = {layer.name: layer for layer in layers}
    result: Dict[str, _Layer] = {}
    for layer in layers:
        host = hosts.get(layer.name)
        if host is None:
            result.setdefault(layer.name, layer)
            continue
        prefix = (layer.name[len(host) + 1 :] if host else layer.name) + "."  # the layer's name inside its host
        current = result.get(host) or by_name.get(host) or _Layer(host, modules[host], (), torch_func_rule)
        names = current.parameter_names + tuple(prefix + own for own in layer.parameter_names)
        result[host] = _Layer(host, current.module, names, torch_func_rule)
    return list(result.values())


def _checked(
    where: str,
    model: nn.Module,
    inputs: Inputs,
    layers: List[_Layer],
    sources: List[Source],
    use_fallback: bool,
    layout,
    distinct: int,
    verify: Callable[[object], None],
):
    """The layout after the single-sample check; where it fails with layers broadcast
    over a shared leading-1 input, the layout found with none broadcast if that one
    passes (kept for later calls), else the first failure."""

    def check(candidate) -> None:
        before, candidate.verified = candidate.verified, distinct
        try:
            with contextlib.nullcontext() if candidate.broadcast_allowed else _layout.without_broadcast():
                verify(candidate)
        except BaseException:
            candidate.verified = before
            raise

    try:
        check(layout)
        return layout
    except _verify.CheckFailed as error:
        if not layout.broadcast or not layout.broadcast_allowed:
            raise
        first = error
    with _layout.without_broadcast():
        retry = probe_layout(where, model, inputs, layers, sources, use_fallback)
        try:
            check(retry)
        except _verify.CheckFailed:
            raise first from None
    _layout.remember(model, _layout.cache_key(model, inputs, layers, sources, use_fallback, True), retry)
    return retry


def _capture(captured: dict, name: str, module: nn.Module, args: tuple, output) -> None:
    if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):  # detached views share versions
        captured[name] = model_io.Call(args[0].detach(), output.detach(), args[0]._version, output._version, module)


def _model_dtype(model: nn.Module) -> torch.dtype:
    floating = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    return floating


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-sample reductions run in: float32 for half-precision models."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _float32_if_half(tensor: torch.Tensor) -> torch.Tensor:
    # Half-precision layers are contracted in float32 (the rules' sums of squares).
    return tensor.to(compute_dtype(tensor.dtype))


class _Pass(NamedTuple):
    """What one forward and backward pass leaves: the logits, the hooked layers,
    what `consume` returned for each layer that was called (by layer name), and the
    broadcast parameters with their per-sample gradients [B, ...]."""

    logits: torch.Tensor
    layers: List[_Layer]
    consumed: Dict[str, Any]  # per layer: (squared norms, method), or its LayerGradients
    functional: List[Tuple[_Functional, torch.Tensor]]
    captured: Dict[str, model_io.Call]
    sources: List[Source]  # the direct parameters
    direct: DirectGradients


def _run_pass(where: str, model: nn.Module, *args, **kwargs) -> _Pass:
    """One pass (below); where the model used its parameters otherwise than the cached
    layout's probe saw (a flag changed since the probe, a branch it did not take), the
    layout is probed again with this call's inputs and the pass repeated once."""
    try:
        return _run_pass_once(where, model, *args, **kwargs)
    except LayoutChanged:
        _layout.forget(model)
    try:
        return _run_pass_once(where, model, *args, **kwargs)
    except LayoutChanged as error:
        raise ValueError(
            f"{error}, also after probing again with this call's inputs: the way the forward uses its parameters "
            "depends on the samples beyond the probe's (a data-dependent branch on parameters). Exclude the "
            "parameters concerned with `params`, or make the use the same for every sample"
        ) from None


class _Plan(NamedTuple):
    batch: int
    temperature: float  # checked
    layers: List[_Layer]  # the hooked layers
    functional: List[_Functional]  # the broadcast-substituted parameters
    sources: List[Source]  # the direct parameters
    layout: Any  # the layout probed for them (gradood/persample/_layout.py)


def _plan(
    where: str,
    model: nn.Module,
    inputs: Inputs,
    loss: Loss,
    temperature: float,
    targets: Optional[torch.Tensor],
    params: ParamSelector,
    functional_params: Optional[str],
    fallback: Optional[str],
    verify: Optional[Callable[[object], None]],
) -> _Plan:
    """The checks every pass makes, and what the pass will hook."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    batch = model_io.check_inputs(where, inputs)
    if not callable(loss) and loss not in LOSSES:
        raise ValueError(f"{where}: loss must be one of {LOSSES} or a callable, got {loss!r}")
    temperature = check_positive(where, "temperature", temperature)
    if loss == "ce" and (targets is None or targets.shape != (batch,)):
        raise ValueError(f"{where}: loss='ce' needs targets of shape [{batch}]")
    _refuse_sample_mixing(model, where)
    if functional_params not in (None, "broadcast"):
        raise ValueError(f"{where}: functional_params must be None or 'broadcast', got {functional_params!r}")
    if fallback not in (None, "torch.func"):
        raise ValueError(f"{where}: fallback must be None or 'torch.func', got {fallback!r}")
    layers, functional, sources = _layers(model, _select(model, params, where), functional_params, where)
    layout = probe_layout(where, model, inputs, layers, sources, fallback == "torch.func")
    if verify is not None and layout.verified < min(batch, _verify.PROBE):
        distinct = _verify.distinct_samples(inputs).numel()  # only these can show samples being mixed
        if layout.verified < distinct:
            layout = _checked(where, model, inputs, layers, sources, fallback == "torch.func", layout, distinct, verify)
    layers, sources = _apply_layout(model, layers, sources, layout)
    return _Plan(batch, temperature, layers, functional, sources, layout)


def _run_pass_once(
    where: str,
    model: nn.Module,
    inputs: Inputs,
    loss: Loss,
    temperature: float,
    targets: Optional[torch.Tensor],
    params: ParamSelector,
    functional_params: Optional[str],
    fallback: Optional[str],
    consume: Callable[[_Layer, Dict[Optional[str], tuple]], object],
    logits_fn: LogitsFn = None,
    capture: Sequence[str] = (),
    squared_only: bool = True,
    verify: Optional[Callable[[object], None]] = None,
) -> _Pass:
    """Validates the arguments, runs the forward and the input-gradient backward with
    parameters frozen and the layers hooked, and restores the model (also on errors).
    consume(layer, {piece: (input, output gradient)}) reduces a layer as soon as the
    backward has produced its gradients (after the pass for the torch.func fallback,
    which replays its module)."""
    batch, temperature, layers, functional, sources, layout = _plan(
        where, model, inputs, loss, temperature, targets, params, functional_params, fallback, verify
    )

    requires_grad = {parameter: parameter.requires_grad for parameter in model.parameters()}
    direct = DirectGradients(
        sources, batch, contributions(layout.steps), squared_only, compute_dtype(_model_dtype(model))
    )
    direct_linear = {
        source.name: _Layer(source.name, source.module, (source.short_name,), DIRECT_LINEAR) for source in sources
    }
    by_name = {layer.name: layer for layer in layers}
    by_name.update(direct_linear)
    recorder = Recorder(
        where,
        lambda name, pieces: consume(by_name[name], pieces),
        deferred=[layer.name for layer in layers if layer.rule is torch_func_rule],
        batch=batch,
        batch_dims=layout.batch_dims,
        broadcast=layout.broadcast,
        folds=layout.folds,
    )

    def linear_piece(name: str, step: int, x: torch.Tensor, output: torch.Tensor, batch_dim: int, fold: int):
        return direct.linear_piece(
            name,
            x,
            output,
            batch_dim,
            fold,
            lambda a, out, dim, k: recorder.record((name, f"op{step}"), a, out, batch_dim=dim, fold=k),
        )

    def embedding_piece(name: str, step: int, batch_dim: int, fold: int, padding_idx, scale_grad_by_freq: bool):
        if not direct.take_piece(name):
            return None
        layer = by_name[name]
        call = EmbeddingCall(direct.proxies[name], padding_idx, scale_grad_by_freq)
        by_name[name] = layer._replace(module=call, rule=DIRECT_EMBEDDING)
        return lambda ids, out: recorder.record((name, f"op{step}"), ids, out, batch_dim=batch_dim, fold=fold)

    proxies = {id(source.parameter): direct.proxies[source.name] for source in sources}
    tracker = PassTracker(
        where,
        layout.steps,
        {id(proxy): name for name, proxy in direct.proxies.items()},
        direct.sink,
        linear_piece,
        embedding_piece,
    )
    handles: List[Any] = []
    overridden: List[nn.Module] = []
    substituted: List[Any] = []
    saved_parameters: Dict[int, Tuple[nn.Module, dict]] = {}  # each module's table, as it was

    def restore() -> None:  # idempotent: hooks, forwards, parameter tables and flags as they were
        for handle in handles:
            handle.remove()
        for module in overridden:
            module.__dict__.pop("forward", None)  # back to the class's forward
        for module, table in saved_parameters.values():
            for short_name in table:
                module.__dict__.pop(short_name, None)
            module._parameters.clear()
            module._parameters.update(table)  # the same objects, in the same order
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
        handles.clear()
        overridden.clear()
        saved_parameters.clear()

    def substitute(module: nn.Module, short_name: str, value: torch.Tensor) -> None:
        saved_parameters.setdefault(id(module), (module, dict(module._parameters)))
        del module._parameters[short_name]
        module.__dict__[short_name] = value

    try:
        for item in functional:  # per-sample copies in place of broadcast parameters
            copies = item.parameter.detach().expand(batch, *item.parameter.shape[1:]).clone().requires_grad_()
            substitute(item.module, item.short_name, copies)
            substituted.append((item, copies))
        if proxies:  # direct parameters: a proxy leaf in every module holding them
            for module in model.modules():
                for short_name, parameter in list(module._parameters.items()):
                    if parameter is not None and id(parameter) in proxies:
                        substitute(module, short_name, proxies[id(parameter)])
        for layer in layers:
            if isinstance(layer.rule, CompositeRule):
                record = functools.partial(record_piece, recorder, layer.name)
                layer.module.forward = functools.partial(layer.rule.forward, layer.module, record)
                overridden.append(layer.module)
            else:
                hook = record_single_input if layer.rule is torch_func_rule else record_output
                handles.append(
                    layer.module.register_forward_hook(functools.partial(hook, recorder, layer.name), with_kwargs=True)
                )
        captured: Dict[str, model_io.Call] = {}
        for name in capture:  # after the recorder's hooks: they see the outputs the graph continues from
            handles.append(model.get_submodule(name).register_forward_hook(functools.partial(_capture, captured, name)))
        for parameter in requires_grad:
            parameter.requires_grad_(False)
        with torch.enable_grad():
            with (
                tracker if sources else contextlib.nullcontext(),
                empty_tensor_caches(model),
                batch_norm_gradient_layout(model),
                watch_outside_uses(where, layers),
            ):
                # watched ops, no caches, a PyTorch bug avoided, the rule layers' parameters used only inside them
                output = model_io.call(
                    model, model_io.detach(inputs)
                )  # gradients w.r.t. parameters only, never the input
            tracker.finish()
            logits = model_io.checked_logits(where, output, batch, logits_fn)
            losses = per_sample_loss(logits, loss, temperature, targets)
            if losses.shape != (batch,):
                raise ValueError(f"{where}: the loss must be per sample, shape [{batch}], got {tuple(losses.shape)}")
            # Proxies are differentiated against too, so that every meeting lies on the backward's path.
            leaves = [leaf for _, leaf in recorder.leaves] + [copies for _, copies in substituted] + direct.leaves()
            recorder.backward_started = tracker.backward_started = True
            # A loss that depends on no selected parameter (the selected layers unused by this
            # forward) has zero gradient for all of them: no backward to run.
            needed = bool(leaves) and losses.requires_grad
            all_grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True) if needed else [None] * len(leaves)
            for (key, _), grad in zip(recorder.leaves, all_grads):
                recorder.give(key, grad)
            functional_grads = all_grads[len(recorder.leaves) : len(recorder.leaves) + len(substituted)]
    finally:
        restore()  # the model as it was before the deferred layers run (the torch.func fallback replays modules)
    recorder.finish_rest()
    functional_pairs = [
        (item, torch.zeros_like(copies) if grad is None else grad)
        for (item, copies), grad in zip(substituted, functional_grads)
    ]
    return _Pass(logits.detach(), layers, recorder.results, functional_pairs, captured, sources, direct)


def _half_pieces_as_float32(pieces: Dict[Optional[str], tuple]) -> Dict[Optional[str], tuple]:
    # Half-precision layers are contracted in float32, one layer at a time.
    return {piece: tuple(_float32_if_half(t) for t in pair) for piece, pair in pieces.items()}


def _owned_names(layer: _Layer) -> Tuple[str, ...]:
    """The model's names of a layer's selected parameters."""
    return tuple(f"{layer.name}.{own}" if layer.name else own for own in layer.parameter_names)


def _single_sample_norms(
    model: nn.Module,
    inputs: Inputs,
    loss: Loss,
    temperature: float,
    targets: Optional[torch.Tensor],
    params: ParamSelector,
    functional_params: Optional[str],
    fallback: Optional[str],
    logits_fn: LogitsFn,
    verify: Optional[Callable[[object], None]],
) -> Optional[PerSampleGradNorms]:
    """A batch of one sample: its gradient is its per-sample gradient, so one plain
    autograd backward gives the norms, exact for any model, without the rules, the
    outside-use watch or the per-layer pieces (the engine's fixed cost exceeds a whole
    training step on small models). The same checks and refusals as any batch (the plan
    is made, and cached, as for the pass), and the same layers in the result, each with
    the method "autograd". None where the input is not one sample of a float32/float64
    model (half-precision models keep the engine's float32 contractions)."""
    if not isinstance(model, nn.Module) or model_io.check_inputs(_WHERE, inputs) != 1:
        return None
    if _model_dtype(model) not in (torch.float32, torch.float64):
        return None
    plan = _plan(
        _WHERE,
        model,
        inputs,
        loss,
        temperature,
        targets,
        params,
        functional_params,
        fallback,
        verify,
    )
    groups: List[Tuple[str, Tuple[str, ...], List[nn.Parameter]]] = []
    for layer in plan.layers:
        groups.append(
            (layer.name, _owned_names(layer), [layer.module.get_parameter(own) for own in layer.parameter_names])
        )
    groups += [(item.name, (item.name,), [item.parameter]) for item in plan.functional]
    groups += [(source.name, (source.name,), [source.parameter]) for source in plan.sources]
    parameters = list({id(p): p for _, _, members in groups for p in members}.values())
    if any(p.dtype not in (torch.float32, torch.float64) for p in parameters):
        return None
    requires_grad = {parameter: parameter.requires_grad for parameter in model.parameters()}
    chosen = {id(p) for p in parameters}
    try:
        for parameter in requires_grad:
            parameter.requires_grad_(id(parameter) in chosen)
        with torch.enable_grad(), empty_tensor_caches(model), batch_norm_gradient_layout(model):
            output = model_io.call(model, model_io.detach(inputs))
            logits = model_io.checked_logits(_WHERE, output, 1, logits_fn)
            losses = per_sample_loss(logits, loss, plan.temperature, targets)
            if losses.shape != (1,):
                raise ValueError(f"{_WHERE}: the loss must be per sample, shape [1], got {tuple(losses.shape)}")
            grads = (
                torch.autograd.grad(losses.sum(), parameters, allow_unused=True)
                if losses.requires_grad
                else [None] * len(parameters)
            )
    finally:
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
    norm_dtype = compute_dtype(logits.dtype)
    present = [(p, g.to_dense() if g.is_sparse else g) for p, g in zip(parameters, grads) if g is not None]
    # One foreach call for every parameter's norm (float32 pairwise sums within each, as the rules' are).
    norms = torch._foreach_norm([g for _, g in present]) if present else []
    squared_of = {id(p): n.to(norm_dtype).square() for (p, _), n in zip(present, norms)}
    zero = logits.new_zeros((), dtype=norm_dtype)
    columns, methods = [], []
    for _, _, members in groups:
        found = [squared_of[id(p)] for p in members if id(p) in squared_of]
        columns.append(sum(found, zero).reshape(1))
        methods.append("autograd" if found else "unused")
    squared_norms = torch.stack(columns, dim=1)
    return PerSampleGradNorms(
        norms=squared_norms.sum(1).sqrt(),
        logits=logits.detach(),
        per_layer=squared_norms,
        layer_names=tuple(name for name, _, _ in groups),
        methods=tuple(methods),
        parameters=tuple(owned for _, owned, _ in groups),
    )


def persample_grad_norms(
    model: nn.Module,
    inputs: Inputs,
    loss: Loss = "ce_pred",
    temperature: float = 1.0,
    targets: Optional[torch.Tensor] = None,
    params: ParamSelector = None,
    per_layer: bool = False,
    functional_params: Optional[str] = None,
    fallback: Optional[str] = None,
    logits: LogitsFn = None,
    verify: Union[bool, int] = True,
) -> PerSampleGradNorms:
    """‖∇_θ ℓ(x_i)‖₂ over the selected parameters θ, for each sample.

    loss: "ce_pred" (CE at the predicted label, temperature T: GRODIN),
    "ce" (with `targets`), "kl_uniform" (GradNorm's loss), "logsumexp", or a
    callable logits [B, C] -> loss [B]. params: all parameters by default, whatever
    their requires_grad flag (a frozen backbone still counts); "trainable" for those
    with requires_grad; parameter names; or a predicate (name, parameter) -> bool.

    The model is left as it was: no `.grad` written, requires_grad flags
    restored and hooks removed, also when an exception is raised. Models whose
    BatchNorm uses batch statistics or whose Dropout is active are refused: call
    model.eval(). Every selected parameter must belong to a module with a rule;
    others raise, naming the parameter. functional_params="broadcast" handles
    parameters that a module uses directly in its forward and that have a leading
    dimension of size 1 broadcast over the batch (a ViT's class token, expanded,
    and position embedding, added): each is replaced for the pass by a per-sample
    copy [B, ...], whose gradient is then each sample's own. This is exact for
    such broadcast uses only, so it is an explicit opt-in. fallback="torch.func"
    handles any other module with parameters (called once, with one tensor) by
    torch.func per-sample gradients of its own parameters (gradood/persample/
    fallback.py): exact, at the cost of materialising them for that module.

    Before the first pass for a model and input shape, the model runs on probe
    batches of 2 and 3 samples (gradood/persample/_layout.py) to check what the
    rules assume. A features-last layer (Linear, LayerNorm, RMSNorm, Embedding)
    may hold the batch in any one dimension (a sequence-first transformer); a
    layer whose input has no single batch dimension (one applied to a table all
    samples share), or a parameter used outside its module's forward (a parent
    calling F.linear with a child's weight, a tied weight), raises an error naming
    it, or, with fallback="torch.func", is replayed per sample with the innermost
    module around it that takes the batch as one batch-first tensor.

    verify: True (default) checks, once per model and input signature, the per-sample
    norms of up to 3 distinct probe samples against autograd on each sample alone
    (gradood/persample/_verify.py); False skips it; an int k also checks k random
    samples of every call the same way, with the call's own loss (k single-sample
    backward passes per call), and raises naming the sample and layer: a bound for
    models whose behaviour depends on the data. A failed check is a ValueError.

    A batch of one sample (a server scoring one request) is one plain autograd
    backward: its gradient is its own per-sample gradient (methods "autograd"), with
    the same checks and refusals as any batch.
    """

    def norms_of(layer: _Layer, pieces: Dict[Optional[str], tuple]) -> Tuple[torch.Tensor, str]:
        return layer_norms(layer, _half_pieces_as_float32(pieces))

    per_call = _verify.call_check_count(_WHERE, verify)
    logits_fn = logits

    check = (
        None
        if not verify
        else functools.partial(_verify.check_norms, _WHERE, model, inputs, params, functional_params, fallback, logits)
    )
    single = _single_sample_norms(
        model, inputs, loss, temperature, targets, params, functional_params, fallback, logits, check
    )
    if single is not None:
        return single._replace(per_layer=single.per_layer if per_layer else None)
    result = _run_pass(
        _WHERE,
        model,
        inputs,
        loss,
        temperature,
        targets,
        params,
        functional_params,
        fallback,
        norms_of,
        logits,
        verify=check,
    )
    pass_logits = result.logits
    norm_dtype = compute_dtype(pass_logits.dtype)
    columns, names, methods, owned = [], [], [], []
    for layer in result.layers:
        names.append(layer.name)
        owned.append(_owned_names(layer))
        if layer.name not in result.consumed:  # never called: its parameters get no gradient
            columns.append(pass_logits.new_zeros(pass_logits.shape[0], dtype=norm_dtype))
            methods.append("unused")
            continue
        squared, method = result.consumed[layer.name]
        columns.append(squared.to(norm_dtype))
        methods.append(method)
    for item, grad in result.functional:
        names.append(item.name)
        owned.append((item.name,))
        grad = _float32_if_half(grad)
        columns.append(grad.reshape(grad.shape[0], -1).square().sum(1).to(norm_dtype))
        methods.append("direct")
    for source in result.sources:
        names.append(source.name)
        owned.append((source.name,))
        method = result.direct.method(source.name)
        if method == "linear":
            squared, method = result.consumed.get(source.name, (result.direct.squared_norms(source.name), "unused"))
        else:
            squared = result.direct.squared_norms(source.name)
        columns.append(squared.to(norm_dtype))
        methods.append(method)
    squared = torch.stack(columns, dim=1)
    if per_call:
        _verify.check_call_norms(
            _WHERE, model, inputs, loss, temperature, targets, logits_fn, owned, names, squared, per_call
        )
    return PerSampleGradNorms(
        norms=squared.sum(1).sqrt(),
        logits=pass_logits,
        per_layer=squared if per_layer else None,
        layer_names=tuple(names),
        methods=tuple(methods),
        parameters=tuple(owned),
    )


class _ZeroGradients(DenseLayerGradients):
    """A layer that was never called: every per-sample gradient is zero."""

    def __init__(self, count: int, numels: Dict[str, int], like: torch.Tensor):
        super().__init__(count, numels, lambda s, e: {n: like.new_zeros(e - s, k) for n, k in numels.items()})


class PerSampleGradients:
    """The per-sample gradients g_i of the selected parameters for one batch, as a
    linear operator (see gradood.persample._grads): never the [B, |θ|] matrix,
    only bounded chunks of one layer at a time. Parameters are keyed by their full
    names (model.named_parameters()); direction and result blocks are flattened,
    [K or L, numel]. Computed in float32 for half-precision models."""

    def __init__(
        self,
        logits: torch.Tensor,
        layers: List[Tuple[Dict[str, str], LayerGradients]],
        shapes: Dict[str, torch.Size],
        captured: Optional[Dict[str, model_io.Call]] = None,
    ):
        self.logits = logits
        #: (input, output) of the modules named in `capture`, from the pass (detached).
        self.captured = captured or {}
        self._layers = layers  # (the layer's own name -> full name, its gradients)
        self.shapes = shapes
        self.names: Tuple[str, ...] = tuple(shapes)

    @property
    def count(self) -> int:
        return self.logits.shape[0]

    def project(
        self, directions: Dict[str, torch.Tensor], scale: Optional[Dict[str, torch.Tensor]] = None
    ) -> torch.Tensor:
        """[B, K]: Σ_params g_i,param · directions[param][k] (directions [K, numel],
        any float dtype; half-precision blocks are upcast in bounded pieces). With
        `scale` ([numel] per parameter), the directions are scaled by it first, one
        layer at a time, so no scaled copy of all of them exists."""
        missing = [name for name in self.names if name not in directions]
        if missing:
            raise ValueError(f"PerSampleGradients.project: no directions for {missing}")
        out = None
        for full_names, grads in self._layers:
            blocks = {}
            for own, full in full_names.items():
                block = directions[full].reshape(directions[full].shape[0], -1)
                blocks[own] = block if scale is None else block * scale[full].to(block.device, block.dtype)
            term = grads.project(blocks)
            out = term if out is None else out.add_(term)
        if out is None:
            raise ValueError("PerSampleGradients.project: the gradients hold no parameter")
        return out

    def weighted_sum(
        self, weights: torch.Tensor, into: Optional[Dict[str, torch.Tensor]] = None
    ) -> Dict[str, torch.Tensor]:
        """Σ_i weights[i, l] g_i per parameter: [L, numel] (weights [B, L]). With
        `into`, each layer's sums are added to into[param] in place as they are
        computed (so only one layer's result exists beside the accumulators)."""
        if weights.dim() != 2 or weights.shape[0] != self.count:
            raise ValueError(
                f"PerSampleGradients.weighted_sum: weights must be [{self.count}, L], got {tuple(weights.shape)}"
            )
        sums = {} if into is None else into
        for full_names, grads in self._layers:
            for own, value in grads.weighted_sum(weights).items():
                if into is None:
                    sums[full_names[own]] = value
                else:
                    into[full_names[own]].add_(value.to(into[full_names[own]].dtype))
        return sums

    def moments(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Per parameter: (batch mean [numel], Σ_i (g_i − mean)² [numel])."""
        result = {}
        for full_names, grads in self._layers:
            for own, value in grads.moments().items():
                result[full_names[own]] = value
        return result

    def materialise(self) -> Dict[str, torch.Tensor]:
        """The per-sample gradients [B, *shape] themselves (projection onto the
        identity): for small models and tests only."""
        result = {}
        for name, shape in self.shapes.items():
            numel = int(torch.Size(shape).numel())
            eye = torch.eye(numel, dtype=compute_dtype(self.logits.dtype), device=self.logits.device)
            directions = {
                other: torch.zeros(numel, int(torch.Size(s).numel()), dtype=eye.dtype, device=eye.device)
                for other, s in self.shapes.items()
            }
            directions[name] = eye
            result[name] = self.project(directions).reshape(self.count, *shape)
        return result


def persample_gradients(
    model: nn.Module,
    inputs: Inputs,
    loss: Loss = "ce_pred",
    temperature: float = 1.0,
    targets: Optional[torch.Tensor] = None,
    params: ParamSelector = None,
    functional_params: Optional[str] = None,
    fallback: Optional[str] = None,
    logits: LogitsFn = None,
    capture: Sequence[str] = (),
    verify: Union[bool, int] = True,
) -> PerSampleGradients:
    """The per-sample gradients ∇_θ ℓ(x_i) of the selected parameters from one
    forward and one backward pass, as a PerSampleGradients operator: projections
    onto directions, weighted sums over samples and batch moments, computed layer
    by layer from each layer's input and output gradient. Arguments, model
    requirements and guarantees as persample_grad_norms; `capture` names modules
    whose (input, output) in the pass are kept in the result's `captured`."""
    where = "gradood.persample_gradients"

    def gradients_of(layer: _Layer, pieces: Dict[Optional[str], tuple]) -> LayerGradients:
        return layer_gradients(layer, _half_pieces_as_float32(pieces))

    per_call = _verify.call_check_count(where, verify)

    result = _run_pass(
        where,
        model,
        inputs,
        loss,
        temperature,
        targets,
        params,
        functional_params,
        fallback,
        gradients_of,
        logits,
        capture,
        squared_only=False,
        verify=None
        if not verify
        else functools.partial(
            _verify.check_gradients, where, model, inputs, params, functional_params, fallback, logits
        ),
    )
    layers: List[Tuple[Dict[str, str], LayerGradients]] = []
    shapes: Dict[str, torch.Size] = {}
    dtype = compute_dtype(result.logits.dtype)
    for layer in result.layers:
        module_parameters = dict(layer.module.named_parameters())
        full_names = {own: f"{layer.name}.{own}" if layer.name else own for own in layer.parameter_names}
        for own, full in full_names.items():
            shapes[full] = module_parameters[own].shape
        grads = result.consumed.get(layer.name)
        if grads is None:
            numels = {own: module_parameters[own].numel() for own in full_names}
            layers.append((full_names, _ZeroGradients(result.logits.shape[0], numels, result.logits.to(dtype))))
            continue
        layers.append((full_names, grads.restrict(tuple(full_names))))
    for item, grad in result.functional:
        shapes[item.name] = item.parameter.shape
        flat = _float32_if_half(grad).reshape(grad.shape[0], -1)
        functional_grads = DenseLayerGradients(
            grad.shape[0], {"value": flat.shape[1]}, functools.partial(_value_rows, flat)
        )
        layers.append(({"value": item.name}, functional_grads))
    for source in result.sources:
        shapes[source.name] = source.parameter.shape
        if result.direct.method(source.name) == "linear" and source.name in result.consumed:
            layers.append(({source.short_name: source.name}, result.consumed[source.name]))
        else:
            layers.append(({"value": source.name}, result.direct.gradients(source.name)))
    gradients = PerSampleGradients(result.logits, layers, shapes, result.captured)
    if per_call:
        _verify.check_call_gradients(where, model, inputs, loss, temperature, targets, logits, gradients, per_call)
    return gradients
