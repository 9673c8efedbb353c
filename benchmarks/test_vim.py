"""ViM's score and fit, every implementation in one run:

    gradood        gradood.detectors.ViM (float64 residual GEMM, fused energy; fit: float64 eigh)
    pytorch_ood    pytorch-ood's ViM (numpy float32 residual, scipy logsumexp; fit: sklearn
                   EmpiricalCovariance and numpy eigh)
    eager          the same score as two lines of torch in float32 (residual GEMM, logsumexp)

    cd benchmarks && python -m pytest test_vim.py --benchmark-json=vim.json

Cases: ImageNet-sized features (D = 2048, C = 1000, dim = 1000) at B = 64 and 256, float32; the
fit on N = 4096 ID features.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradood.detectors import ViM

CASES = {"B64-D2048-C1000": (64, 2048, 1000), "B256-D2048-C1000": (256, 2048, 1000)}
IMPLEMENTATIONS = ["gradood", "pytorch_ood", "eager"]
FIT_SAMPLES = 4096


def _setup(dims, classes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(dims, classes)).eval()
    with torch.no_grad():
        model[1].bias.add_(1.0)
    fit = torch.randn(FIT_SAMPLES, dims).relu()
    return model, fit


def _theirs(model, fit):
    from gradood.testing import import_torchvision

    pytest.importorskip("sklearn")
    import_torchvision()
    try:
        from pytorch_ood.detector import ViM as TheirViM
    except ImportError as error:
        pytest.skip(f"pytorch-ood does not import: {error}")
    return TheirViM(model=lambda x: x, d=1000, w=model[1].weight, b=model[1].bias)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_vim_score(benchmark, case, implementation):
    batch, dims, classes = CASES[case]
    model, fit = _setup(dims, classes)
    features = torch.randn(batch, dims).relu()
    logits = model(features).detach()
    detector = ViM(model, dim=1000).fit(fit)
    expected = detector.score_features(logits.double(), features.double())
    if implementation == "gradood":

        def run():
            return detector.score_features(logits, features)

    elif implementation == "eager":
        origin, null_space, alpha = detector.origin.float(), detector.null_space.float(), detector.alpha

        def run():
            return torch.logsumexp(logits, 1) - alpha * torch.linalg.vector_norm((features - origin) @ null_space, dim=1)

    else:
        theirs = _theirs(model, fit)
        theirs.fit_features(fit, torch.zeros(fit.shape[0], dtype=torch.long))

        def run():
            return -theirs.predict_features(features)

    benchmark.group = f"vim-score-{case}"
    result = run()
    benchmark.extra_info["max_abs_err_vs_float64"] = float((result.double() - expected).abs().max())
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("implementation", ["gradood", "pytorch_ood"])
def test_vim_fit(benchmark, implementation):
    model, fit = _setup(2048, 1000)
    if implementation == "gradood":

        def run():
            return ViM(model, dim=1000).fit(fit)

    else:
        theirs = _theirs(model, fit)

        def run():
            return theirs.fit_features(fit, torch.zeros(fit.shape[0], dtype=torch.long))

    benchmark.group = "vim-fit-N4096-D2048"
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
