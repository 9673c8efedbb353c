"""Full-network per-sample gradient norms and per-sample gradient operators (one
forward, one backward), with one norm rule and one gradient rule per layer type:
linear.py, conv.py, norm.py, embedding.py, attention.py."""

from gradood.persample._grads import DenseLayerGradients, LayerGradients, register_grad_rule
from gradood.persample._rules import CompositeRule, RuleResult, register_composite_rule, register_rule
from gradood.persample.engine import PerSampleGradients, PerSampleGradNorms, persample_grad_norms, persample_gradients
from gradood.persample.losses import LOSSES
from gradood.persample.supported import supported_layers

__all__ = [
    "persample_grad_norms",
    "PerSampleGradNorms",
    "persample_gradients",
    "PerSampleGradients",
    "register_rule",
    "register_composite_rule",
    "CompositeRule",
    "RuleResult",
    "register_grad_rule",
    "LayerGradients",
    "DenseLayerGradients",
    "LOSSES",
    "supported_layers",
]
