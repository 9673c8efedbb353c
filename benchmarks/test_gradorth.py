"""GradOrth's score and fit from penultimate features, every implementation in one run:

    gradood     gradood.detectors.GradOrth: score_features (‖p − u‖ · ‖Sᵀv‖ in closed form: one
                B × D × k GEMM) and fit (streamed float64 Rᵀ R, eigh)
    eager       the closed form as a float32 torch composition (softmax, GEMM, norms)
    autograd    the definition: per-sample autograd of the KL-to-uniform loss with respect to the
                head's weight, projected on S S^T (B = 64 only)

    cd benchmarks && python -m pytest test_gradorth.py --benchmark-json=gradorth.json

No library ships GradOrth (no official code either). Cases: D = 2048, C = 1000, float32, the
subspace fitted on N = 20,000 features (k = its 0.97-energy rank).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradood.detectors import GradOrth

DIMS, CLASSES, FIT = 2048, 1000, 20_000
CASES = {"B1024": 1024, "B64": 64}


def _setup(batch):
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(DIMS, CLASSES)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(CLASSES, DIMS, generator=generator) / DIMS**0.5)
    # ID features with a decaying spectrum (so that the 0.97-energy rank is well below D)
    scales = torch.logspace(0, -3, DIMS)
    fit = (torch.randn(FIT, DIMS, generator=generator) * scales).abs()
    features = (torch.randn(batch, DIMS, generator=generator) * scales).abs()
    return model, fit, features


@pytest.mark.parametrize("implementation", ["gradood", "eager", "autograd"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradorth_score(benchmark, case, implementation):
    batch = CASES[case]
    if implementation == "autograd" and batch > 64:
        pytest.skip("one backward per sample: B = 64 only")
    model, fit, features = _setup(batch)
    logits = model(features).detach()
    detector = GradOrth(model).fit(fit.split(1000))
    basis = detector.basis.float()
    if implementation == "gradood":

        def run():
            return detector.score_features(logits, features)

    elif implementation == "eager":

        def run():
            deviation = (torch.softmax(logits, 1) - 1.0 / CLASSES).norm(dim=1)
            return deviation * (features @ basis).norm(dim=1)

    else:
        projector = basis @ basis.T
        head = model[1]

        def run():
            out = []
            for v in features:
                loss = -F.log_softmax(head(v[None]), dim=1).mean()
                (gradient,) = torch.autograd.grad(loss, head.weight)
                out.append((gradient @ projector).norm())
            return torch.stack(out)

    benchmark.group = f"gradorth-score-{case}-D{DIMS}-C{CLASSES}-k{basis.shape[1]}"
    expected = detector.score_features(logits.double(), features.double())
    benchmark.extra_info["max_rel_err_vs_float64"] = float(((run().double() - expected).abs() / expected).max())
    benchmark.pedantic(run, rounds=5 if implementation == "autograd" else 15, iterations=1, warmup_rounds=1)


def test_gradorth_fit(benchmark):
    model, fit, _ = _setup(64)
    batches = fit.split(1000)
    benchmark.group = f"gradorth-fit-N{FIT}-D{DIMS}"
    benchmark.pedantic(lambda: GradOrth(model).fit(batches), rounds=3, iterations=1, warmup_rounds=1)
