"""ASH's score from penultimate features and the head, every implementation in one run:

    gradood        gradood.detectors.ASH.score_features (gradood::top_features, the head on the
                   kept features by gradood::pruned_linear with the head's blocked Wᵀ cached
                   by the detector, the fused energy)
    gradood_function  gradood.detectors.ash.ash_energy (the same without the cache: the
                   pruned product from B = 256, a dense GEMM of the pruned features below)
    pytorch_ood    pytorch-ood's ash_s / ash_b / ash_p on [B, D, 1, 1], the head, its energy
    eager_topk     the paper's code as a torch composition (topk + scatter, head, logsumexp)
    eager_compiled the same under torch.compile (compiled once, outside the timed rounds)

    cd benchmarks && python -m pytest test_ash.py --benchmark-json=ash.json

Cases: B = 1024 ImageNet-sized features (D = 2048, C = 1000) and B = 64, float32, p = 90.
pytorch-ood prunes its input in place: it gets a fresh copy each round (the copy is timed
for every implementation alike: each starts from `features.clone()`).
"""

from __future__ import annotations

import pytest
import torch

from torch import nn

from gradood.detectors import ASH
from gradood.detectors.ash import ash_energy

CASES = {"B1024-D2048-C1000": (1024, 2048, 1000), "B64-D2048-C1000": (64, 2048, 1000)}
IMPLEMENTATIONS = ["gradood", "gradood_function", "pytorch_ood", "eager_topk", "eager_compiled"]


def _eager(x: torch.Tensor, weight, bias, variant: str, percentile: float) -> torch.Tensor:
    n = x.shape[1]
    k = n - int(round(n * percentile / 100.0))
    s1 = x.sum(1)
    values, indices = x.topk(k, dim=1)
    if variant == "b":
        values = (s1 / k)[:, None].expand_as(values)
    shaped = torch.zeros_like(x).scatter_(1, indices, values)
    if variant == "s":
        shaped = shaped * torch.exp(s1 / shaped.sum(1))[:, None]
    return torch.logsumexp(torch.nn.functional.linear(shaped, weight, bias), dim=1)


def _pytorch_ood(variant: str):
    from gradood.testing import import_torchvision

    import_torchvision()
    try:
        from pytorch_ood.detector import ash
    except ImportError as error:
        pytest.skip(f"pytorch-ood does not import: {error}")
    return {"s": ash.ash_s, "b": ash.ash_b, "p": ash.ash_p}[variant]


@pytest.mark.parametrize("variant", ["s", "b"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_ash_score(benchmark, case, implementation, variant):
    batch, dims, classes = CASES[case]
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, dims, generator=generator).relu()
    weight = torch.randn(classes, dims, generator=generator) / dims**0.5
    bias = torch.randn(classes, generator=generator)
    expected = ash_energy(features.double(), weight.double(), bias.double(), variant, 90.0)
    if implementation == "gradood":
        model = nn.Sequential(nn.Identity(), nn.Linear(dims, classes)).eval()
        with torch.no_grad():
            model[1].weight.copy_(weight)
            model[1].bias.copy_(bias)
        detector = ASH(model, variant=variant, percentile=90.0)
        detector.score(features[:2])  # finds the head
        logits = model(features).detach()

        def run():
            return detector.score_features(logits, features.clone())

    elif implementation == "gradood_function":

        def run():
            return ash_energy(features.clone(), weight, bias, variant, 90.0)

    elif implementation == "eager_compiled":
        compiled = torch.compile(_eager, dynamic=False)

        def run():
            return compiled(features.clone(), weight, bias, variant, 90.0)

    elif implementation == "eager_topk":

        def run():
            return _eager(features.clone(), weight, bias, variant, 90.0)

    else:
        shape = _pytorch_ood(variant)

        def run():
            maps = shape(features.clone()[:, :, None, None], 0.9)
            return torch.logsumexp(torch.nn.functional.linear(maps.flatten(1), weight, bias), dim=1)

    benchmark.group = f"ash-{variant}-{case}"
    result = run()
    benchmark.extra_info["max_rel_err_vs_float64"] = float(((result.double() - expected).abs() / expected.abs()).max())
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)
