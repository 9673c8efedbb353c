"""DICE's score from penultimate features and the fitted mask, every implementation in one run:

    gradood        gradood.detectors.DICE.score_features (the kept weights only: gradood::pruned_linear
                   with samples and classes swapped at B > 32 on AVX2/AVX-512, torch's sparse CSR
                   product otherwise; the fused energy)
    pytorch_ood    pytorch-ood's DICE.predict_features (x[:, None, :] * masked_w summed: B × C × D)
    eager          the masked head as one GEMM and torch.logsumexp
    eager_compiled the same under torch.compile (compiled once, outside the timed rounds)

    cd benchmarks && python -m pytest test_dice.py --benchmark-json=dice.json

Cases: ImageNet-sized features (D = 2048, C = 1000) at B = 8, 64, 256 and 1024, float32, p = 90
(pytorch-ood's B × C × D intermediate is 8 GB at B = 1024: skipped there).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradood.detectors import DICE

CASES = {
    "B8-D2048-C1000": (8, 2048, 1000),
    "B64-D2048-C1000": (64, 2048, 1000),
    "B256-D2048-C1000": (256, 2048, 1000),
    "B1024-D2048-C1000": (1024, 2048, 1000),
}
IMPLEMENTATIONS = ["gradood", "pytorch_ood", "eager", "eager_compiled"]


def _eager(features, masked, bias):
    return torch.logsumexp(features @ masked.T + bias, 1)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_dice_score(benchmark, case, implementation):
    batch, dims, classes = CASES[case]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(dims, classes)).eval()
    fit = torch.randn(512, dims).relu()
    features = torch.randn(batch, dims).relu()
    detector = DICE(model, percentile=90).fit(fit)
    logits = model(features).detach()
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    masked = torch.where(detector.mask, weight, torch.zeros(()))
    expected = torch.logsumexp(features.double() @ masked.double().T + bias.double(), 1)
    if implementation == "gradood":

        def run():
            return detector.score_features(logits, features)

    elif implementation == "eager":

        def run():
            return _eager(features, masked, bias)

    elif implementation == "eager_compiled":
        compiled = torch.compile(_eager, dynamic=False)

        def run():
            return compiled(features, masked, bias)

    else:
        if batch > 256:
            pytest.skip("pytorch-ood's B x C x D intermediate does not fit")
        from gradood.testing import import_torchvision

        import_torchvision()
        try:
            from pytorch_ood.detector import DICE as TheirDICE
        except ImportError as error:
            pytest.skip(f"pytorch-ood does not import: {error}")
        theirs = TheirDICE(model=lambda x: x, w=weight, b=bias, p=90.0)
        theirs.fit_features(fit, torch.zeros(fit.shape[0], dtype=torch.long))

        def run():
            return -theirs.predict_features(features)

    benchmark.group = f"dice-{case}"
    result = run()
    benchmark.extra_info["max_rel_err_vs_float64"] = float(((result.double() - expected).abs() / expected.abs()).max())
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)
