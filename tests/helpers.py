"""Shared test data and high-precision references."""

from __future__ import annotations

import functools

import mpmath
import torch
from torch import nn


def make_layer_and_features(num_classes: int, num_features: int, batch: int, seed: int, logit_scale: float = 3.0):
    """A float64 nn.Linear with logits of roughly `logit_scale` spread, and
    post-ReLU-like (non-negative, some zero) features."""
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(num_features, num_classes).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(num_classes, num_features, generator=generator, dtype=torch.float64))
        layer.weight.mul_(logit_scale / max(1.0, num_features**0.5))
        layer.bias.copy_(torch.randn(num_classes, generator=generator, dtype=torch.float64))
    features = torch.randn(batch, num_features, generator=generator, dtype=torch.float64).clamp_min(-0.2) + 0.2
    return layer, features


def logits_of(layer: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(features)


@functools.lru_cache(maxsize=None)
def _mp_context():
    mpmath.mp.dps = 60
    return mpmath.mp


def mp_lastlayer_norm(logits_row, features_row, loss: str, p: float, temperature: float, include_bias: bool) -> float:
    """‖δ‖_p · ‖[v(, 1)]‖_p in 60-digit arithmetic from float64 inputs (docs/conventions.md, the last-layer table)."""
    mp = _mp_context()
    f = [mp.mpf(float(x)) for x in logits_row]
    v = [mp.mpf(float(x)) for x in features_row]
    T = mp.mpf(temperature)
    P = mp.mpf(p)
    top = max(f)
    predicted = max(range(len(f)), key=lambda j: (f[j], -j))
    exps = [mp.exp((x - top) / T) for x in f]
    total = mp.fsum(exps)
    probs = [e / total for e in exps]
    num_classes = len(f)

    def norm(values):
        return mp.fsum(abs(x) ** P for x in values) ** (1 / P)

    if loss == "kl_uniform":
        delta_norm = norm([(q - mp.mpf(1) / num_classes) / T for q in probs])
    elif loss == "ce_pred":
        delta_norm = norm([(q - (1 if j == predicted else 0)) / T for j, q in enumerate(probs)])
    elif loss == "energy":
        delta_norm = norm(probs)
    elif loss == "expected_ce":
        delta_norm = mp.fsum(
            probs[y] * norm([(q - (1 if j == y else 0)) / T for j, q in enumerate(probs)]) for y in range(num_classes)
        )
    else:
        raise ValueError(loss)
    feature_norm = norm(v + [mp.mpf(1)] if include_bias else v)
    return float(delta_norm * feature_norm)


def tiny_classifier():
    """A factory for `gradood bench --model helpers:tiny_classifier` in the CLI test."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


class ScoringClassifier(nn.Module):
    """A classifier returning (logits, score) from one forward pass, the way a
    deployed model carries its OOD score: score(logits, features, head) -> [B]."""

    def __init__(self, score):
        super().__init__()
        self.score = score
        self.backbone = nn.Sequential(nn.Linear(12, 16), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, inputs):
        features = self.backbone(inputs)
        logits = self.head(features)
        return logits, self.score(logits, features, self.head)


def pytorch_ood_detectors():
    """pytorch_ood.detector, its torchvision import through gradood.testing.import_torchvision;
    skips the test where pytorch-ood is not installed or does not import."""
    import pytest

    from gradood.testing import import_torchvision

    try:
        import_torchvision()
        return pytest.importorskip("pytorch_ood.detector")
    except ImportError as error:
        pytest.skip(f"pytorch-ood does not import: {error}")
