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

import functools
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from gradood._checks import check_positive
from gradood.persample import attention, conv, embedding, linear, norm  # noqa: F401  (register the rules)
from gradood.persample._rules import CompositeRule, rule_for
from gradood.persample.fallback import torch_func_rule
from gradood.persample.losses import LOSSES, Loss, per_sample_loss

ParamSelector = Union[None, Iterable[str], Callable[[str, nn.Parameter], bool]]

_WHERE = "gradood.persample_grad_norms"


class PerSampleGradNorms(NamedTuple):
    """norms [B]: L2 norm over the selected parameters; logits [B, C] of the same
    forward (detached); per_layer [B, L] squared norms per layer (when asked),
    with layer_names and the method of each layer's weight ("ghost",
    "materialise" or "direct")."""

    norms: torch.Tensor
    logits: torch.Tensor
    per_layer: Optional[torch.Tensor]
    layer_names: Tuple[str, ...]
    methods: Tuple[str, ...]


class _Functional(NamedTuple):
    """A parameter its module uses directly in forward (a ViT's class token or
    position embedding), handled by batch broadcast substitution."""

    name: str
    module: nn.Module
    short_name: str
    parameter: nn.Parameter


class _Layer(NamedTuple):
    name: str
    module: nn.Module
    parameter_names: Tuple[str, ...]  # the module's own names of its selected parameters
    rule: object  # a rule function, a CompositeRule, or the torch.func fallback


def _refuse_sample_mixing(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training or module.running_mean is None:
                raise ValueError(
                    f"{_WHERE}: {name or 'the model'} ({type(module).__name__}) normalises with batch statistics "
                    "(train mode, or no running statistics), which mixes the samples of a batch: "
                    "call model.eval() first"
                )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training:
            raise ValueError(f"{_WHERE}: {name} ({type(module).__name__}) is in train mode: call model.eval() first")
        if isinstance(module, nn.MultiheadAttention) and module.training and module.dropout > 0:
            raise ValueError(f"{_WHERE}: {name} (MultiheadAttention) applies dropout in train mode: call model.eval() first")


def _select(model: nn.Module, params: ParamSelector) -> Dict[str, nn.Parameter]:
    named = dict(model.named_parameters())
    trainable = {name: p for name, p in named.items() if p.requires_grad}
    if params is None:
        selected = trainable
    elif callable(params):
        selected = {name: p for name, p in trainable.items() if params(name, p)}
    else:
        names = [params] if isinstance(params, str) else list(params)
        unknown = [name for name in names if name not in named]
        if unknown:
            raise ValueError(f"{_WHERE}: params names unknown parameters: {unknown}")
        frozen = [name for name in names if name not in trainable]
        if frozen:
            raise ValueError(f"{_WHERE}: params names frozen parameters (requires_grad=False): {frozen}")
        selected = {name: trainable[name] for name in names}
    if not selected:
        raise ValueError(f"{_WHERE}: no trainable parameter is selected")
    return selected


def _layers(
    model: nn.Module, selected: Dict[str, nn.Parameter], functional_params: Optional[str], fallback: Optional[str]
) -> Tuple[List[_Layer], List[_Functional]]:
    owners: Dict[int, Tuple[str, nn.Module, str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for short_name, parameter in module._parameters.items():
            if parameter is None:
                continue
            if id(parameter) in owners and owners[id(parameter)][1] is not module:
                raise ValueError(
                    f"{_WHERE}: parameter {module_name + '.' + short_name!r} is shared by two modules "
                    f"({owners[id(parameter)][0] or 'the model'} and {module_name}); per-sample norms of shared "
                    "parameters are not supported"
                )
            owners[id(parameter)] = (module_name, module, short_name)
    for module_name, module in model.named_modules():
        if isinstance(rule_for(module), CompositeRule):  # e.g. MultiheadAttention's out_proj
            for short_name, parameter in module.named_parameters():
                owners[id(parameter)] = (module_name, module, short_name)
    by_module: Dict[int, _Layer] = {}
    functional: List[_Functional] = []
    for full_name, parameter in selected.items():
        module_name, module, short_name = owners[id(parameter)]
        rule = rule_for(module)
        if rule is None and fallback == "torch.func":
            rule = torch_func_rule
        if rule is None:
            if functional_params == "broadcast" and parameter.dim() >= 1 and parameter.shape[0] == 1:
                functional.append(_Functional(full_name, module, short_name, parameter))
                continue
            raise ValueError(
                f"{_WHERE}: parameter {full_name!r} belongs to {module_name or 'the model'} "
                f"({type(module).__name__}), which has no per-sample norm rule (supported: Linear, Conv1d, Conv2d, "
                "BatchNorm, LayerNorm, GroupNorm, RMSNorm, Embedding, MultiheadAttention). Exclude it with `params`, "
                "or freeze it; a parameter of leading size 1 that the model broadcasts over the batch (a class "
                "token, a position embedding) is handled with functional_params='broadcast', any module "
                "with fallback='torch.func'."
            )
        layer = by_module.get(id(module))
        names = (layer.parameter_names if layer else ()) + (short_name,)
        by_module[id(module)] = _Layer(module_name, module, names, rule)
    return list(by_module.values()), functional


class _Recorder:
    """Keeps, per (layer, piece), the piece's input and its output, the tensor the
    loss is differentiated against."""

    def __init__(self):
        self.records: Dict[Tuple[str, Optional[str]], Tuple[torch.Tensor, int, torch.Tensor]] = {}

    def record(self, key: Tuple[str, Optional[str]], layer_input: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if key in self.records:
            raise RuntimeError(
                f"{_WHERE}: {key[0]} was called twice in one forward; per-sample norms of reused modules are "
                "not supported"
            )
        if not output.requires_grad:  # the start of the chain we differentiate
            output = output.detach().requires_grad_()
        self.records[key] = (layer_input.detach(), layer_input._version, output)
        # The graph continues from a copy, so in-place ops downstream (ReLU(inplace=True))
        # leave the tensor we take the gradient against untouched.
        return output.clone()


def _record_output(recorder: _Recorder, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return recorder.record((name, None), args[0], output)


def _record_single_input(recorder: _Recorder, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    if len(args) != 1 or not isinstance(output, torch.Tensor):
        raise ValueError(
            f"{_WHERE}: fallback='torch.func' needs {name or 'the model'} ({type(module).__name__}) to take one "
            f"tensor and return one, got {len(args)} inputs"
        )
    return recorder.record((name, None), args[0], output)


def _record_piece(recorder: _Recorder, name: str, piece: str, layer_input: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    return recorder.record((name, piece), layer_input, output)


def _float32_if_half(tensor: torch.Tensor) -> torch.Tensor:
    # Half-precision layers are contracted in float32 (the rules' sums of squares).
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def persample_grad_norms(
    model: nn.Module,
    inputs: torch.Tensor,
    loss: Loss = "ce_pred",
    temperature: float = 1.0,
    targets: Optional[torch.Tensor] = None,
    params: ParamSelector = None,
    per_layer: bool = False,
    functional_params: Optional[str] = None,
    fallback: Optional[str] = None,
) -> PerSampleGradNorms:
    """‖∇_θ ℓ(x_i)‖₂ over the selected trainable parameters θ, for each sample.

    loss: "ce_pred" (CE at the predicted label, temperature T: GRODIN),
    "ce" (with `targets`), "kl_uniform" (GradNorm's loss), "logsumexp", or a
    callable logits [B, C] -> loss [B]. params: parameter names, or a predicate
    (name, parameter) -> bool; default all trainable parameters.

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
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_WHERE}: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"{_WHERE}: inputs must be a tensor, got {type(inputs).__name__}")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(f"{_WHERE}: inputs must be a non-empty batch [B, ...], got shape {tuple(inputs.shape)}")
    if not callable(loss) and loss not in LOSSES:
        raise ValueError(f"{_WHERE}: loss must be one of {LOSSES} or a callable, got {loss!r}")
    temperature = check_positive(_WHERE, "temperature", temperature)
    if loss == "ce" and (targets is None or targets.shape != (inputs.shape[0],)):
        raise ValueError(f"{_WHERE}: loss='ce' needs targets of shape [{inputs.shape[0]}]")
    _refuse_sample_mixing(model)
    if functional_params not in (None, "broadcast"):
        raise ValueError(f"{_WHERE}: functional_params must be None or 'broadcast', got {functional_params!r}")
    if fallback not in (None, "torch.func"):
        raise ValueError(f"{_WHERE}: fallback must be None or 'torch.func', got {fallback!r}")
    layers, functional = _layers(model, _select(model, params), functional_params, fallback)

    requires_grad = {parameter: parameter.requires_grad for parameter in model.parameters()}
    recorder = _Recorder()
    handles, overridden, substituted = [], [], []
    saved_parameters: Dict[int, Tuple[nn.Module, dict]] = {}  # each module's table, as it was

    def restore() -> None:  # idempotent: hooks, forwards, parameter tables and flags as they were
        for handle in handles:
            handle.remove()
        for module in overridden:
            module.__dict__.pop("forward", None)  # back to the class's forward
        for item, _ in substituted:
            item.module.__dict__.pop(item.short_name, None)
        for module, table in saved_parameters.values():
            module._parameters.clear()
            module._parameters.update(table)  # the same objects, in the same order
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
        handles.clear()
        overridden.clear()
        saved_parameters.clear()

    try:
        for item in functional:  # per-sample copies in place of broadcast parameters
            saved_parameters.setdefault(id(item.module), (item.module, dict(item.module._parameters)))
            del item.module._parameters[item.short_name]
            copies = item.parameter.detach().expand(inputs.shape[0], *item.parameter.shape[1:]).clone()
            item.module.__dict__[item.short_name] = copies.requires_grad_()
            substituted.append((item, copies))
        for layer in layers:
            if isinstance(layer.rule, CompositeRule):
                record = functools.partial(_record_piece, recorder, layer.name)
                layer.module.forward = functools.partial(layer.rule.forward, layer.module, record)
                overridden.append(layer.module)
            else:
                hook = _record_single_input if layer.rule is torch_func_rule else _record_output
                handles.append(layer.module.register_forward_hook(functools.partial(hook, recorder, layer.name)))
        for parameter in requires_grad:
            parameter.requires_grad_(False)
        with torch.enable_grad():
            logits = model(inputs)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != inputs.shape[0]:
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"{_WHERE}: the model must return logits [B, C], got {shape}")
            losses = per_sample_loss(logits, loss, temperature, targets)
            if losses.shape != (inputs.shape[0],):
                raise ValueError(f"{_WHERE}: the loss must be per sample, shape [{inputs.shape[0]}], got {tuple(losses.shape)}")
            keys = list(recorder.records)
            outputs = [recorder.records[key][2] for key in keys] + [copies for _, copies in substituted]
            all_grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True) if outputs else []
            grads, functional_grads = all_grads[: len(keys)], all_grads[len(keys) :]
        restore()  # the model as it was before the rules run (the torch.func fallback replays modules)
        pieces_of: Dict[str, Dict[Optional[str], tuple]] = {}
        for key, grad in zip(keys, grads):
            layer_name, piece = key
            layer_input, version, output = recorder.records[key]
            if layer_input._version != version:
                raise RuntimeError(
                    f"{_WHERE}: the input of {layer_name} was modified in place after the layer ran; "
                    "its per-sample norm cannot be computed"
                )
            grad = torch.zeros_like(output) if grad is None else grad
            pieces_of.setdefault(layer_name, {})[piece] = (layer_input, grad)

        # Half-precision layers are contracted in float32, one layer at a time.
        norm_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        columns, names, methods = [], [], []
        for layer in layers:
            names.append(layer.name)
            pieces = pieces_of.get(layer.name)
            if pieces is None:  # never called: its parameters get no gradient
                columns.append(logits.new_zeros(inputs.shape[0], dtype=norm_dtype))
                methods.append("unused")
                continue
            pieces = {piece: tuple(_float32_if_half(t) for t in pair) for piece, pair in pieces.items()}
            if isinstance(layer.rule, CompositeRule):
                result = layer.rule.norms(layer.module, pieces)
            else:
                result = layer.rule(layer.module, *pieces[None])
            columns.append(sum(result.squared_norms[name] for name in layer.parameter_names).to(norm_dtype))
            methods.append(result.method)
        for (item, copies), grad in zip(substituted, functional_grads):
            names.append(item.name)
            grad = torch.zeros_like(copies) if grad is None else _float32_if_half(grad)
            columns.append(grad.reshape(grad.shape[0], -1).square().sum(1).to(norm_dtype))
            methods.append("direct")
        squared = torch.stack(columns, dim=1)
        return PerSampleGradNorms(
            norms=squared.sum(1).sqrt(),
            logits=logits.detach(),
            per_layer=squared if per_layer else None,
            layer_names=tuple(names),
            methods=tuple(methods),
        )
    finally:
        restore()
