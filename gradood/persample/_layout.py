"""What the per-layer rules assume, checked before a pass: every hooked layer's
rows are the batch's samples, and every selected parameter reaches the loss
through its own module's forward only.

Both are found by running the model on two probe batches, of 2 and 3 samples (copies of the first inputs), with every module's calls and
every use of a selected parameter watched:

- The batch dimension of each layer's input is the one dimension that is 2 in
  the first probe and 3 in the second, all others being equal. Dimension 0 is
  what the rules expect; a features-last layer (Linear, LayerNorm, RMSNorm,
  Embedding) may have it elsewhere (a sequence-first transformer's [T, B, E]),
  and the pass moves it to the front. An input with no batch dimension (a
  layer applied to a table shared by all samples, such as Swin V2's relative
  position MLP) or with the batch in two places does not fit the rules.
- A parameter used by an op while its module's forward is not running (a
  parent calling F.linear with a child's weight, as torchvision's Swin
  attention does, or a weight tied to a second use) has a gradient part that
  its module's rule never sees.

Either would give a wrong norm, so each is an error naming the layer or the
parameter, or, with fallback="torch.func", the layer is handed to the innermost
module around it that takes the batch as one batch-first tensor: that module is
replayed by torch.func per sample, for its own parameters and the handed-over
ones. The result depends on the model's modules, the input's trailing shape, dtype
and device and the selected layers only; it is computed once per combination
and kept with the model (weakly)."""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from gradood import model_io
from gradood.model_io import Inputs
from gradood.persample._rules import CompositeRule, batch_may_move
from gradood.persample.fallback import torch_func_rule

_PROBE_SIZES = (2, 3)
_CACHE_PER_MODEL = 8
_CACHE: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()

Key = Tuple[str, Optional[str]]  # (layer, piece)


class Layout(NamedTuple):
    """batch_dims: the batch dimension of each (layer, piece)'s input and output
    where it is not 0; hosts: layer name -> the module (by name) whose torch.func
    replay covers that layer's parameters instead of its rule."""

    batch_dims: Dict[Key, int]
    hosts: Dict[str, str]


def _inside(inner: str, outer: str) -> bool:
    """Whether module `inner` is `outer` or lies inside it (names from named_modules)."""
    return outer == "" or inner == outer or inner.startswith(outer + ".")


def _has_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(item, torch.Tensor) for item in value)


class _ParameterUses(TorchFunctionMode):
    """Calls on_use(parameter id) for every op that takes a watched parameter (or
    a list holding one) and returns a tensor: metadata reads (size, dim, dtype)
    are not uses."""

    def __init__(self, watched: Set[int], on_use: Callable[[int], None]):
        super().__init__()
        self.watched, self.on_use = watched, on_use

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if _has_tensor(result):
            for value in (*args, *kwargs.values()):
                for item in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(item, torch.Tensor) and id(item) in self.watched:
                        self.on_use(id(item))
        return result


class _Probe:
    """One probe forward's observations: the input shape of every module called
    with a tensor first (and of every composite piece), the modules active at
    each call, and, per parameter used outside its layer's forward, the modules
    active at every such use."""

    def __init__(self, layers: Sequence, names: Dict[int, str]):
        self.names = names  # id(module) -> name
        self.stack: List[str] = []
        self.shapes: Dict[Key, Tuple[torch.Size, Tuple[str, ...], bool]] = {}  # shape, active modules, one tensor in
        # layer -> (the first parameter used outside its forward, the modules active at every such use)
        self.outside: Dict[str, Tuple[str, Tuple[str, ...]]] = {}
        self.owner: Dict[int, Tuple[str, str]] = {}  # id(parameter) -> (layer, full parameter name)
        for layer in layers:
            for own in layer.parameter_names:
                full = f"{layer.name}.{own}" if layer.name else own
                self.owner[id(layer.module.get_parameter(own))] = (layer.name, full)

    def enter(self, module, args) -> None:
        name = self.names[id(module)]
        self.stack.append(name)
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and (name, None) not in self.shapes:
            one_tensor = len(args) == 1
            self.shapes[(name, None)] = (first.shape, tuple(self.stack[:-1]), one_tensor)

    def leave(self, module, args, output) -> None:
        self.stack.pop()

    def piece(self, layer: str, piece: str, layer_input: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        self.shapes.setdefault((layer, piece), (layer_input.shape, tuple(self.stack), False))
        return output

    def use(self, parameter_id: int) -> None:
        layer, full = self.owner[parameter_id]
        if layer in self.stack:
            return
        active = tuple(self.stack)
        first, before = self.outside.get(layer, (full, active))
        self.outside[layer] = (first, tuple(name for name in before if name in active))


def _run_probe(model: nn.Module, inputs: Inputs, size: int, layers: Sequence) -> _Probe:
    names = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    names.update({id(layer.module): layer.name for layer in layers})  # a reused module: the layer's own name
    probe = _Probe(layers, names)
    handles, overridden = [], []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(probe.enter, prepend=True))  # before a weight_norm hook
            handles.append(module.register_forward_hook(probe.leave, always_call=True))
        for layer in layers:
            if isinstance(layer.rule, CompositeRule):
                record = functools.partial(probe.piece, layer.name)
                layer.module.forward = functools.partial(layer.rule.forward, layer.module, record)
                overridden.append(layer.module)
        batch = model_io.select(inputs, torch.arange(size) % model_io.batch_size(inputs))
        with torch.enable_grad(), _ParameterUses(set(probe.owner), probe.use):  # as the pass: a forward may differentiate
            model_io.call(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for module in overridden:
            module.__dict__.pop("forward", None)
    return probe


def _batch_dim(shapes: Sequence[Optional[torch.Size]]) -> Optional[int]:
    """The one dimension that equals the probe sizes, all others being equal; None otherwise."""
    first, second = shapes
    if len(first) != len(second):
        return None
    scaling = [d for d in range(len(first)) if (first[d], second[d]) == _PROBE_SIZES]
    fixed = all(first[d] == second[d] for d in range(len(first)) if d not in scaling)
    return scaling[0] if len(scaling) == 1 and fixed else None


def _layout_problem(shapes: Sequence[torch.Size]) -> str:
    first, second = shapes
    if first == second:
        return (f"its input, {tuple(first)} at batch sizes {_PROBE_SIZES[0]} and {_PROBE_SIZES[1]} alike, does not depend "
                "on the batch (the layer is applied to something all samples share), so its rows are not samples")
    return (f"its input has shape {tuple(first)} at batch size {_PROBE_SIZES[0]} and {tuple(second)} at "
            f"{_PROBE_SIZES[1]}: the rules need one batch dimension, the first (a features-last layer — Linear, "
            "LayerNorm, RMSNorm, Embedding — may have it anywhere)")


def probe_layout(where: str, model: nn.Module, inputs: Inputs, layers: Sequence, use_fallback: bool) -> Layout:
    """The layout of this pass (cached per model, input signature and layer selection);
    raises ValueError where a rule would give a wrong norm and no host applies."""
    key = (model_io.signature(inputs), use_fallback,
           tuple((layer.name, layer.parameter_names) for layer in layers), tuple(map(id, model.modules())))
    cache = _CACHE.setdefault(model, OrderedDict())
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    try:
        probes = [_run_probe(model, inputs, size, layers) for size in _PROBE_SIZES]
    except ValueError:  # a rule refusing a module (gradood's message)
        raise
    except Exception as error:
        raise RuntimeError(
            f"{where}: running the model on probe batches of {_PROBE_SIZES[0]} and {_PROBE_SIZES[1]} samples (to find "
            f"each layer's batch dimension) failed: {type(error).__name__}: {error}"
        ) from error
    layout = _decide(where, layers, probes, use_fallback)
    cache[key] = layout
    while len(cache) > _CACHE_PER_MODEL:
        cache.popitem(last=False)
    return layout


def _decide(where: str, layers: Sequence, probes: List[_Probe], use_fallback: bool) -> Layout:
    by_name = {layer.name: layer for layer in layers}
    rule_layers = {layer.name for layer in layers if layer.rule is not torch_func_rule}
    batch_dims: Dict[Key, int] = {}
    hosts: Dict[str, str] = {}

    def host_for(layer: str, active: Sequence[str], problem: str) -> None:
        """Hands `layer` to the innermost module of `active` around it that can be
        replayed per sample, or raises."""
        for candidate in reversed(active):
            if not _inside(layer, candidate) or candidate == layer or candidate in rule_layers:
                continue
            seen = [probe.shapes.get((candidate, None)) for probe in probes]
            if all(s is not None and s[2] for s in seen) and _batch_dim([s[0] for s in seen]) == 0:
                if use_fallback:
                    hosts[layer] = candidate
                    return
                raise ValueError(
                    f"{where}: {problem}. Pass fallback='torch.func' to compute that layer's per-sample gradients by "
                    f"replaying {candidate or 'the model'} with torch.func, or exclude its parameters with `params`"
                )
        raise ValueError(f"{where}: {problem}; no module around it takes the batch as one tensor to replay it per "
                         "sample. Exclude its parameters with `params`, or freeze them")

    for name in sorted(set(probes[0].outside) | set(probes[1].outside)):
        seen = [probe.outside[name] for probe in probes if name in probe.outside]
        parameter = seen[0][0]
        active = [module for module in seen[0][1] if all(module in modules for _, modules in seen)]
        layer = by_name[name]
        problem = (f"parameter {parameter!r} of {name or 'the model'} ({type(layer.module).__name__}) is used outside "
                   f"that module's forward (inside {(active[-1] if active else '') or 'the model'}'s forward), so its "
                   "per-sample gradient has a part the layer's rule does not see")
        host_for(name, active, problem)

    keys = set(probes[0].shapes) & set(probes[1].shapes)
    for key in sorted(keys, key=lambda k: (k[0], k[1] or "")):
        name, piece = key
        if name not in by_name or name in hosts:
            continue
        layer = by_name[name]
        if piece is None and isinstance(layer.rule, CompositeRule):  # its pieces are checked
            continue
        seen = [probe.shapes[key] for probe in probes]
        dim = _batch_dim([s[0] for s in seen])
        if dim == 0:
            continue
        if dim is not None and piece is None and batch_may_move(layer.module):
            batch_dims[key] = dim
            continue
        what = f"{name or 'the model'} ({type(layer.module).__name__}{', piece ' + piece if piece else ''})"
        active = [m for m in seen[0][1] if m in seen[1][1]]
        host_for(name, active, f"{what}: {_layout_problem([s[0] for s in seen])}")

    for name in list(hosts):  # a host that is itself handed over: follow to the outermost
        while hosts[name] in hosts:
            hosts[name] = hosts[hosts[name]]
    return Layout(batch_dims, hosts)
