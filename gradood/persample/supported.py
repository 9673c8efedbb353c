"""The layer types the per-sample engine has rules for, read from its registries."""

from __future__ import annotations

from typing import List, NamedTuple

from gradood.persample import _grads, _rules


class SupportedLayer(NamedTuple):
    """One registered layer type: `layer` is the class's qualified name, `norms` how its
    per-sample gradient norms are computed ("rule": a norm rule on the layer's input and
    output gradient; "composite": the layer's forward replayed piece by piece),
    `gradients` whether persample_gradients (LowDimGrad) has a gradient rule for it, and
    `rule` the module holding the norm rule."""

    layer: str
    norms: str
    gradients: bool
    rule: str


def _name(module_type) -> str:
    return module_type if isinstance(module_type, str) else _rules.qualified_name(module_type)


def supported_layers() -> List[SupportedLayer]:
    """Every layer class with a per-sample rule, sorted by name. Third-party classes
    (timm, transformers) are registered by qualified name and matched exactly, without
    importing their package. Parameters of other layers are followed op by op where they
    meet the batch (gradood/persample/_direct.py) or refused with an error naming them."""
    with_gradients = {_name(module_type) for module_type in _grads._GRAD_RULES}
    rows = [
        SupportedLayer(_name(t), "rule", _name(t) in with_gradients, rule.__module__)
        for t, rule in _rules._RULES.items()
    ]
    rows += [
        SupportedLayer(_name(t), "composite", type(rule).grads is not _rules.CompositeRule.grads, type(rule).__module__)
        for t, rule in _rules._COMPOSITE_RULES.items()
    ]
    return sorted(rows)
