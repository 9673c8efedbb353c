"""Full-network per-sample gradient norms (one forward, one backward), with one
norm rule per layer type: linear.py, conv.py, norm.py, embedding.py, attention.py."""

from gradood.persample._rules import CompositeRule, RuleResult, register_composite_rule, register_rule
from gradood.persample.engine import PerSampleGradNorms, persample_grad_norms
from gradood.persample.losses import LOSSES

__all__ = [
    "persample_grad_norms",
    "PerSampleGradNorms",
    "register_rule",
    "register_composite_rule",
    "CompositeRule",
    "RuleResult",
    "LOSSES",
]
