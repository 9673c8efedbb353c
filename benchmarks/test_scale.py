"""SCALE's score from penultimate features, logits and the head, every implementation in one run:

    gradood        gradood.detectors.SCALE.score_features (gradood::top_features for s₁ and s₂,
                   W v read from the logits as f − b instead of a second GEMM, the fused energy)
    gradood_function  gradood.detectors.scale.scale_energy (the same with the head's GEMM on
                   the features, for callers without the logits)
    eager_topk     the paper's code as a torch composition (topk for s₂, the scaled features
                   through the head, logsumexp)
    eager_compiled the same under torch.compile (compiled once, outside the timed rounds)

    cd benchmarks && python -m pytest test_scale.py --benchmark-json=scale.json

pytorch-ood 0.2.1 has no SCALE. Cases: ImageNet-sized features (D = 2048, C = 1000) at
B = 1024, 64 and 8, float32, p = 85. Every implementation gets the features and the logits of one
forward (the eager code ignores the logits, as the paper's does).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradood.detectors import SCALE
from gradood.detectors.scale import scale_energy

CASES = {"B1024-D2048-C1000": (1024, 2048, 1000), "B64-D2048-C1000": (64, 2048, 1000), "B8-D2048-C1000": (8, 2048, 1000)}
IMPLEMENTATIONS = ["gradood", "gradood_function", "eager_topk", "eager_compiled"]


def _eager(x: torch.Tensor, weight, bias, percentile: float) -> torch.Tensor:
    n = x.shape[1]
    k = n - int(round(n * percentile / 100.0))
    s1 = x.sum(1)
    s2 = x.topk(k, dim=1).values.sum(1)
    scaled = x * torch.exp(s1 / s2)[:, None]
    return torch.logsumexp(torch.nn.functional.linear(scaled, weight, bias), dim=1)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_scale_score(benchmark, case, implementation):
    batch, dims, classes = CASES[case]
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, dims, generator=generator).relu()
    model = nn.Sequential(nn.Identity(), nn.Linear(dims, classes)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(classes, dims, generator=generator) / dims**0.5)
        model[1].bias.copy_(torch.randn(classes, generator=generator))
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    logits = model(features).detach()
    expected = scale_energy(features.double(), weight.double(), bias.double(), 85.0)
    if implementation == "gradood":
        detector = SCALE(model, percentile=85.0)
        detector.score(features[:2])  # finds the head

        def run():
            return detector.score_features(logits, features)

    elif implementation == "gradood_function":

        def run():
            return scale_energy(features, weight, bias, 85.0)

    elif implementation == "eager_compiled":
        compiled = torch.compile(_eager, dynamic=False)

        def run():
            return compiled(features, weight, bias, 85.0)

    else:

        def run():
            return _eager(features, weight, bias, 85.0)

    benchmark.group = f"scale-{case}"
    result = run()
    benchmark.extra_info["max_rel_err_vs_float64"] = float(((result.double() - expected).abs() / expected.abs()).max())
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)
