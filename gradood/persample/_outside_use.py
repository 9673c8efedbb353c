"""The real pass's check that every parameter a layer rule handles is used only
inside its layer's forward.

The layout probe decides, once per model and input signature, which parameters
are used outside their module's forward (a parent calling F.linear with a child's
weight, a tied weight) and follows those op by op; the others get their layer's
rule, which sees only what the layer's forward does with them. A use outside the
forward that the probe did not see — a runtime flag changed since, a branch the
probe samples did not take — would be a gradient contribution no rule sees: a
wrong norm. While the pass's forward runs, this mode watches every op for a
rule-handled parameter among its direct arguments while its layer is not running,
and raises LayoutChanged; the engine then probes again with this call's inputs
and repeats the pass once (gradood/persample/engine.py).

Uses without a gradient path are not counted: metadata reads (shape, dtype),
`detach()`/`.data`, and ops under torch.no_grad(). Views of the parameter made before the
pass count as the parameter. Not seen: a custom autograd.Function taking the parameter
(its forward runs under no_grad); verify=k covers such models.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Dict, Iterator, Sequence, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._pytree import tree_flatten

from gradood.persample._direct import LayoutChanged

_NO_GRADIENT = ("Tensor.detach", "Tensor.detach_", "Tensor.data.__get__", "Tensor.requires_grad_")
# Ops that return None and write their tensor operands into another tensor.
_WRITES = frozenset({torch.Tensor.__setitem__})


class _OutsideUseWatch(TorchFunctionMode):
    def __init__(self, where: str, watched: Dict[int, Tuple[str, int]], running: Counter):
        super().__init__()
        self.where, self.watched, self.running = where, watched, running

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        # Metadata reads (shape, dtype, _version: most ops the engine's own hooks issue) return
        # no tensor, so no gradient path: answered before the operands are looked at. An
        # assignment (`buffer[:] = weight`) also returns None, but writes a gradient path.
        if not torch.is_grad_enabled():
            return result
        if func not in _WRITES and not (isinstance(result, torch.Tensor) or _has_tensor(result)):
            return result
        for leaf in _operands(args, kwargs):
            key = id(leaf)
            if key not in self.watched:
                with torch._C.DisableTorchFunction():  # reading _base is an op the outer modes would see
                    base = leaf._base
                key = None if base is None else id(base)
            if key in self.watched:  # the parameter, or a view of it made before the pass
                name, module = self.watched[key]
                if self.running[module] == 0 and resolve_name(func) not in _NO_GRADIENT:
                    raise LayoutChanged(
                        f"{self.where}: parameter {name!r} is used outside its module's forward (in "
                        f"{resolve_name(func) or func}), which the layout probe did not see"
                    )
        return result


def _operands(args: tuple, kwargs: dict):
    """The tensors among the arguments, also inside lists and tuples (torch.cat); cheaper
    than a full tree flatten on every op of the forward."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    yield item
                elif isinstance(item, (list, tuple)):
                    yield from _operands(tuple(item), {})


def _has_tensor(value) -> bool:
    """Whether an op's result holds a tensor (metadata reads: shape, dtype, device, hold
    none): tensors, tuples/lists (named tuples too) and dicts are looked into, as a tree
    flatten would, at a fraction of its cost on every op of the forward."""
    if isinstance(value, torch.Tensor):
        return True
    if value is None or isinstance(value, (bool, int, float, torch.Size)):
        return False
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(item) for item in value)
    if isinstance(value, dict):
        return any(_has_tensor(item) for item in value.values())
    if isinstance(value, (complex, str, torch.dtype, torch.device)):
        return False
    return any(isinstance(leaf, torch.Tensor) for leaf in tree_flatten(value)[0])  # other containers


@contextlib.contextmanager
def watch_outside_uses(where: str, layers: Sequence) -> Iterator[None]:
    """While active: LayoutChanged at any use with a gradient path of a parameter of
    `layers` (the engine's rule layers: name, module, parameter_names) outside its
    layer's forward (the layer's module, or a module it calls, running)."""
    watched: Dict[int, Tuple[str, int]] = {}
    for layer in layers:
        module: nn.Module = layer.module
        for own in layer.parameter_names:
            try:
                parameter = module.get_parameter(own)
            except AttributeError:  # substituted for the pass (a direct parameter's proxy): not a rule's
                continue
            if isinstance(parameter, torch.Tensor):
                watched[id(parameter)] = (f"{layer.name}.{own}" if layer.name else own, id(module))
    if not watched:
        yield
        return
    running: Counter = Counter()
    modules = {id(layer.module): layer.module for layer in layers}
    handles = []

    def enter(module, args, kwargs):
        running[id(module)] += 1

    def leave(module, args, output):
        running[id(module)] -= 1

    try:
        for module in modules.values():
            # First of the pre-hooks (weight_norm-style pre-hooks run inside the layer) and first
            # of the forward hooks (a user's forward hook using the weight again runs outside it).
            handles.append(module.register_forward_pre_hook(enter, prepend=True, with_kwargs=True))
            handles.append(module.register_forward_hook(leave, prepend=True, always_call=True))
        with _OutsideUseWatch(where, watched, running):
            yield
    finally:
        for handle in handles:
            handle.remove()
