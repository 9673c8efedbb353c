"""What the per-layer rules assume, checked before a pass: every hooked layer's
rows are the batch's samples, and every selected parameter reaches the loss
through its own module's forward only.

Both are found by running the model on two probe batches, of 2 and 3 samples
(copies of the first inputs), with every module's calls watched by hooks and
every op on a parameter by gradood.persample._direct.ProbeTracker:

- The batch dimension of each layer's input is the one dimension that is 2 in
  the first probe and 3 in the second, all others being equal. Dimension 0 is
  what the rules expect; a features-last layer (Linear, LayerNorm, RMSNorm,
  Embedding) may have it elsewhere (a sequence-first transformer's [T, B, E]),
  and the pass moves it to the front; one whose input has a leading dimension
  of 1 at both sizes (BERT's position ids, shared by the batch) is *broadcast*:
  the pass expands its input and output to the batch, so each sample's output
  gradient is its own (where the model then reshapes that output so that the
  expansion changes what it computes — Swin V2's `mlp(table).view(-1, heads)` —
  the single-sample check fails, and the layout is found again with no layer
  broadcast, those layers becoming direct). Any other layer without a batch-first input (one applied
  to a table all samples share, such as Swin V2's relative position MLP, or a
  conv fed a batch-last tensor) has its parameters handled as direct parameters.
- A parameter used by an op while its module's forward is not running (a
  parent calling F.linear with a child's weight, as torchvision's Swin
  attention does, or a weight tied to a second use) has a gradient part that
  its module's rule never sees: its layer's parameters become direct too.

Direct parameters (gradood/persample/_direct.py) get their per-sample gradients
op by op. Where that is impossible (an op mixing the batch, a data-dependent
forward) it is an error naming the parameter, or, with fallback="torch.func",
the parameter's module is replayed per sample by torch.func; a composite layer
(MultiheadAttention) with such a problem is handed to the innermost module
around it that takes the batch as one batch-first tensor. The result depends on
the model's modules, the input's signature and the selected layers only; it is
computed once per combination and kept with the model (weakly).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from gradood import model_io
from gradood.model_io import Inputs
from gradood.persample._caches import empty_tensor_caches
from gradood.persample._direct import LayoutChanged, ProbeTracker, Source, Step, folded_factor, plan_steps  # noqa: F401
from gradood.persample._rules import CompositeRule, batch_may_move
from gradood.persample.fallback import torch_func_rule

_PROBE_SIZES = (2, 3)
_CACHE_PER_MODEL = 8
_CACHE: weakref.WeakKeyDictionary[nn.Module, OrderedDict] = weakref.WeakKeyDictionary()
_BROADCAST = contextvars.ContextVar("gradood_persample_broadcast", default=True)


@contextlib.contextmanager
def without_broadcast():
    """Layouts found inside treat layers on a shared leading-1 input as direct ones."""
    token = _BROADCAST.set(False)
    try:
        yield
    finally:
        _BROADCAST.reset(token)


def cache_key(
    model: nn.Module, inputs: Inputs, layers: Sequence, sources: Sequence[Source], use_fallback: bool, broadcast: bool
) -> tuple:
    return (
        model_io.signature(inputs),
        use_fallback,
        tuple(source.name for source in sources),
        tuple((layer.name, layer.parameter_names) for layer in layers),
        tuple(map(id, model.modules())),
        _hooks(model),
        broadcast,
    )


def forget(model: nn.Module) -> None:
    """Drops the model's cached layouts: the next pass probes again."""
    _CACHE.pop(model, None)


def remember(model: nn.Module, key: tuple, layout: Layout) -> None:
    """Keeps `layout` for calls with this key (the broadcast-free one after a failed check)."""
    _CACHE.setdefault(model, OrderedDict())[key] = layout


Key = Tuple[str, Optional[str]]  # (layer, piece)


class Layout:
    """batch_dims: the batch dimension of each (layer, piece)'s input and output
    where it is not 0; hosts: layer name -> the module (by name) whose torch.func
    replay covers that layer's parameters instead of its rule; broadcast: layers
    whose input has a leading dimension of 1 shared by the batch; direct: the names
    of the parameters handled op by op, and direct_layers the rule layers whose
    parameters became direct; steps: the pass's ops on them; replayed: module name
    -> its own parameters replayed with torch.func (fallback="torch.func").
    verified: how many distinct samples the single-sample check has passed on (it
    checks up to 3; a first call with one sample, or with identical ones, cannot
    show mixing, so a later call with more distinct samples checks again)."""

    def __init__(
        self,
        batch_dims: Dict[Key, int],
        hosts: Dict[str, str],
        broadcast: Set[Key],
        direct: Set[str],
        direct_layers: Set[str],
        steps: List[Step],
        replayed: Dict[str, Tuple[str, ...]],
        folds: Dict[Key, int],
    ):
        self.batch_dims, self.hosts, self.broadcast, self.folds = batch_dims, hosts, frozenset(broadcast), folds
        self.direct, self.direct_layers, self.steps = frozenset(direct), frozenset(direct_layers), steps
        self.replayed = replayed
        self.verified = 0
        self.broadcast_allowed = True


def layer_input(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """A module call's input: its first positional argument, or, called with keywords
    only, its first tensor keyword argument; None if neither is a tensor."""
    if args:
        return args[0] if isinstance(args[0], torch.Tensor) else None
    return next((value for value in kwargs.values() if isinstance(value, torch.Tensor)), None)


def _inside(inner: str, outer: str) -> bool:
    """Whether module `inner` is `outer` or lies inside it (names from named_modules)."""
    return outer == "" or inner == outer or inner.startswith(outer + ".")


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
        self.owner: Dict[str, str] = {}  # full parameter name -> its rule layer
        self.watched: Dict[int, str] = {}  # id(parameter) -> full name, for every selected parameter
        for layer in layers:
            for own in layer.parameter_names:
                full = f"{layer.name}.{own}" if layer.name else own
                self.owner[full] = layer.name
                self.watched[id(layer.module.get_parameter(own))] = full
        self.records: list = []
        self.layer_names = {layer.name for layer in layers}
        self.tracker: Optional[ProbeTracker] = None

    def enter(self, module, args, kwargs) -> None:
        name = self.names[id(module)]
        self.stack.append(name)
        first = layer_input(args, kwargs)
        if first is not None and (name, None) not in self.shapes:
            one_tensor = len(args) == 1 and not any(isinstance(v, torch.Tensor) for v in kwargs.values())
            self.shapes[(name, None)] = (first.shape, tuple(self.stack[:-1]), one_tensor)

    def leave(self, module, args, output) -> None:
        name = self.stack.pop()
        seen = self.shapes.get((name, None))
        if seen is not None and seen[2] and not isinstance(output, torch.Tensor):  # a replay needs one tensor out too
            self.shapes[(name, None)] = (seen[0], seen[1], False)
        if self.tracker is not None and name in self.layer_names:
            self.tracker.layer_output(output, name)

    def piece(self, layer: str, piece: str, layer_input: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        self.shapes.setdefault((layer, piece), (layer_input.shape, tuple(self.stack), False))
        return output

    def use(self, parameter: str, active: Tuple[str, ...], via: frozenset) -> None:
        layer = self.owner.get(parameter)
        if layer is None or layer in active or layer in via:
            return
        first, before = self.outside.get(layer, (parameter, active))
        self.outside[layer] = (first, tuple(name for name in before if name in active))


def _run_probe(model: nn.Module, inputs: Inputs, size: int, layers: Sequence, sources: Sequence[Source]) -> _Probe:
    names: Dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    names.update({id(layer.module): layer.name for layer in layers})  # a reused module: the layer's own name
    probe = _Probe(layers, names)
    probe.watched.update({id(source.parameter): source.name for source in sources})
    handles, overridden = [], []
    try:
        for module in model.modules():
            handles.append(
                module.register_forward_pre_hook(probe.enter, prepend=True, with_kwargs=True)
            )  # before weight_norm's
            handles.append(module.register_forward_hook(probe.leave, always_call=True))
        for layer in layers:
            if isinstance(layer.rule, CompositeRule):
                record = functools.partial(probe.piece, layer.name)
                layer.module.forward = functools.partial(layer.rule.forward, layer.module, record)
                overridden.append(layer.module)
        batch = model_io.select(inputs, torch.arange(size) % model_io.batch_size(inputs))
        tracker = ProbeTracker(probe.watched, list(model_io.tensors(batch).values()), probe.stack, probe.use)
        probe.tracker = tracker
        with torch.enable_grad(), tracker, empty_tensor_caches(model):  # as the pass: a forward may differentiate
            model_io.call(model, batch)
        probe.records = tracker.records
    finally:
        probe.tracker = None
        for handle in handles:
            handle.remove()
        for module in overridden:
            module.__dict__.pop("forward", None)
    return probe


def _batch_dim(shapes: Sequence[torch.Size]) -> Optional[int]:
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
        return (
            f"its input, {tuple(first)} at batch sizes {_PROBE_SIZES[0]} and {_PROBE_SIZES[1]} alike, does not depend "
            "on the batch (the layer is applied to something all samples share), so its rows are not samples"
        )
    return (
        f"its input has shape {tuple(first)} at batch size {_PROBE_SIZES[0]} and {tuple(second)} at "
        f"{_PROBE_SIZES[1]}: the rules need one batch dimension, the first (a features-last layer — Linear, "
        "LayerNorm, RMSNorm, Embedding — may have it anywhere)"
    )


def _hooks(model: nn.Module) -> tuple:
    """What decides the modules' behaviour that the module ids do not: the forward hooks
    in place (each module's and the global ones, by handle id), instance forwards and
    classes. One added, removed or replaced after the first pass changes what the layers
    output, so the layout (and its single-sample check) is found again. Behaviour that
    changes while all these stay (a flag read in forward) is not seen: check again with
    a fresh model object, or compare with gradood.testing's loops."""
    hooks = nn.modules.module
    own = tuple(
        (index, tuple(module._forward_hooks), tuple(module._forward_pre_hooks))
        for index, module in enumerate(model.modules())
        if module._forward_hooks or module._forward_pre_hooks
    )
    replaced = tuple(
        (index, type(module), id(module.__dict__.get("forward")))
        for index, module in enumerate(model.modules())
        if "forward" in module.__dict__
    )  # an instance forward set after the first call
    classes = tuple(map(type, model.modules()))  # a __class__ swapped
    return own, replaced, classes, tuple(hooks._global_forward_hooks), tuple(hooks._global_forward_pre_hooks)


def probe_layout(
    where: str, model: nn.Module, inputs: Inputs, layers: Sequence, sources: Sequence[Source], use_fallback: bool
) -> Layout:
    """The layout of this pass (cached per model, input signature and parameter
    selection); raises ValueError where no exact way is found."""
    broadcast = _BROADCAST.get()
    key = cache_key(model, inputs, layers, sources, use_fallback, broadcast)
    cache = _CACHE.setdefault(model, OrderedDict())
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    try:
        probes = [_run_probe(model, inputs, size, layers, sources) for size in _PROBE_SIZES]
    except ValueError:  # a rule refusing a module (gradood's message)
        raise
    except Exception as error:
        raise RuntimeError(
            f"{where}: running the model on probe batches of {_PROBE_SIZES[0]} and {_PROBE_SIZES[1]} samples (to find "
            f"each layer's batch dimension) failed: {type(error).__name__}: {error}"
        ) from error
    layout = _decide(where, layers, sources, probes, use_fallback, broadcast)
    layout.broadcast_allowed = broadcast  # its check's own passes must find it again
    cache[key] = layout
    while len(cache) > _CACHE_PER_MODEL:
        cache.popitem(last=False)
    return layout


def _is_broadcast(shapes: Sequence[torch.Size]) -> bool:
    """A leading dimension of 1 at both probe sizes, the rest equal: one input shared by the batch."""
    first, second = shapes
    return first == second and len(first) >= 1 and first[0] == 1


def _decide(
    where: str,
    layers: Sequence,
    sources: Sequence[Source],
    probes: List[_Probe],
    use_fallback: bool,
    allow_broadcast: bool = True,
) -> Layout:
    by_name = {layer.name: layer for layer in layers}
    rule_layers = {layer.name for layer in layers if layer.rule is not torch_func_rule}
    batch_dims: Dict[Key, int] = {}
    hosts: Dict[str, str] = {}
    broadcast: Set[Key] = set()
    folds: Dict[Key, int] = {}
    direct_layers: Set[str] = set()

    def host_for(layer: str, active: Sequence[str], problem: str) -> None:
        """Hands `layer` to the innermost module of `active` around it that can be
        replayed per sample, or raises."""
        for candidate in reversed(active):
            if not _inside(layer, candidate) or candidate == layer or candidate in rule_layers:
                continue
            seen = [probe.shapes.get((candidate, None)) for probe in probes]
            if all(s is not None and s[2] for s in seen) and _batch_dim([s[0] for s in seen if s is not None]) == 0:
                if use_fallback:
                    hosts[layer] = candidate
                    return
                raise ValueError(
                    f"{where}: {problem}. Pass fallback='torch.func' to compute that layer's per-sample gradients by "
                    f"replaying {candidate or 'the model'} with torch.func, or exclude its parameters with `params`"
                )
        raise ValueError(
            f"{where}: {problem}; no module around it takes the batch as one tensor to replay it per "
            "sample. Exclude its parameters with `params`, or freeze them"
        )

    for name in sorted(set(probes[0].outside) | set(probes[1].outside)):
        layer = by_name[name]
        if not isinstance(layer.rule, CompositeRule):
            direct_layers.add(name)  # every use of its parameters op by op
            continue
        seen = [probe.outside[name] for probe in probes if name in probe.outside]
        active = [module for module in seen[0][1] if all(module in modules for _, modules in seen)]
        problem = (
            f"parameter {seen[0][0]!r} of {name or 'the model'} ({type(layer.module).__name__}) is used outside "
            f"that module's forward (inside {(active[-1] if active else '') or 'the model'}'s forward), so its "
            "per-sample gradient has a part the layer's rule does not see"
        )
        host_for(name, active, problem)

    keys = set(probes[0].shapes) & set(probes[1].shapes)
    for key in sorted(keys, key=lambda k: (k[0], k[1] or "")):
        name, piece = key
        if name not in by_name or name in hosts or name in direct_layers:
            continue
        layer = by_name[name]
        if piece is None and isinstance(layer.rule, CompositeRule):  # its pieces are checked
            continue
        probed = [probe.shapes[key] for probe in probes]
        shapes = [s[0] for s in probed]
        dim = _batch_dim(shapes)
        if dim == 0:
            continue
        if piece is None and batch_may_move(layer.module):
            if dim is not None:
                batch_dims[key] = dim
                continue
            if allow_broadcast and _is_broadcast(shapes):
                broadcast.add(key)
                continue
            fold = folded_factor(shapes[0], shapes[1], _PROBE_SIZES)
            if fold > 1:  # a batch folded with k rows per sample (Swin's windows): unfolded to [B, k, ...]
                folds[key] = fold
                continue
        if piece is None and layer.rule is not torch_func_rule:
            direct_layers.add(name)
            continue
        what = f"{name or 'the model'} ({type(layer.module).__name__}{', piece ' + piece if piece else ''})"
        active = [m for m in probed[0][1] if m in probed[1][1]]
        host_for(name, active, f"{what}: {_layout_problem(shapes)}")

    for name in list(hosts):  # a host that is itself handed over: follow to the outermost
        while hosts[name] in hosts:
            hosts[name] = hosts[hosts[name]]

    owners = {source.name: (source.module_name, source.short_name) for source in sources}
    for name in direct_layers:
        for own in by_name[name].parameter_names:
            owners[f"{name}.{own}" if name else own] = (name, own)
    direct = set(owners)
    replayed: Dict[str, Tuple[str, ...]] = {}

    def replay_host(parameter: str, message: str, stack: Tuple[str, ...]) -> str:
        """The parameter's module, or the innermost module around the op that takes
        the batch as one batch-first tensor, to replay it per sample."""
        module_name = owners[parameter][0]
        candidates = [module_name] + [m for m in reversed(stack) if _inside(module_name, m) and m != module_name]
        for candidate in candidates:
            seen = [probe.shapes.get((candidate, None)) for probe in probes]
            if all(s is not None and s[2] for s in seen) and _batch_dim([s[0] for s in seen if s is not None]) == 0:
                return candidate
        raise ValueError(f"{message}; no module around it takes the batch as one tensor to replay it per sample")

    steps, problems = plan_steps(where, [probe.records for probe in probes], direct, _PROBE_SIZES)
    while problems:
        if not use_fallback:
            raise ValueError(next(iter(problems.values()))[0])
        for parameter, (message, stack) in problems.items():  # replayed per sample instead
            host = replay_host(parameter, message, stack)
            relative = parameter[len(host) + 1 :] if host else parameter
            replayed[host] = replayed.get(host, ()) + (relative,)
            direct.discard(parameter)
        steps, problems = plan_steps(where, [probe.records for probe in probes], direct, _PROBE_SIZES)
    return Layout(batch_dims, hosts, broadcast, direct, direct_layers, steps, replayed, folds)
