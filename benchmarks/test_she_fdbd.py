"""SHE's and fDBD's scores and fits from penultimate features, every implementation in one run:

    gradood        gradood.detectors.SHE / FDBD: score_features (float64 dot product with the
                   predicted class's pattern; fDBD's gaps over cached boundary norms) and fit
    pytorch_ood    pytorch-ood's SHE.fit_features / predict_features (SHE only; fDBD is not in it)
    eager          OpenOOD's fDBD postprocessor as a torch composition (its C x C denominator
                   matrix built once, outside the timed rounds), in float32

    cd benchmarks && python -m pytest test_she_fdbd.py --benchmark-json=she_fdbd.json

Cases: ImageNet-sized features (D = 2048, C = 1000), B = 1024 and B = 64 scored, float32; the
fits on N = 20,000 features.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradood.detectors import FDBD, SHE

CASES = {"B1024-D2048-C1000": (1024, 2048, 1000), "B64-D2048-C1000": (64, 2048, 1000)}
FIT = 20_000


def _setup(batch, dims, classes):
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(dims, classes)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(classes, dims, generator=generator) / dims**0.5)
    # Fit features near each class's weight row, so that every class is predicted (and correct)
    classes_of = torch.arange(FIT) % classes
    fit = (model[1].weight.detach()[classes_of] * 20 + torch.randn(FIT, dims, generator=generator)).relu()
    with torch.no_grad():
        labels = model(fit).argmax(1)
    assert labels.unique().numel() == classes
    features = torch.randn(batch, dims, generator=generator).relu()
    return model, fit, labels, features


def _their_she(model):
    from gradood.testing import import_torchvision

    import_torchvision()
    try:
        from pytorch_ood.detector import SHE as TheirSHE
    except ImportError as error:
        pytest.skip(f"pytorch-ood does not import: {error}")
    return TheirSHE(backbone=lambda x: x, head=model[1])


@pytest.mark.parametrize("implementation", ["gradood", "pytorch_ood"])
@pytest.mark.parametrize("case", list(CASES))
def test_she_score(benchmark, case, implementation):
    model, fit, labels, features = _setup(*CASES[case])
    logits = model(features).detach()
    if implementation == "gradood":
        detector = SHE(model).fit([(fit, labels)])

        def run():
            return detector.score_features(logits, features)

    else:
        theirs = _their_she(model)
        with torch.no_grad():
            theirs.fit_features(fit, labels)

        def run():
            with torch.no_grad():
                return -theirs.predict_features(features)

    benchmark.group = f"she-score-{case}"
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("implementation", ["gradood", "pytorch_ood"])
def test_she_fit(benchmark, implementation):
    model, fit, labels, _ = _setup(*CASES["B64-D2048-C1000"])
    batches = [(fit[i : i + 1000], labels[i : i + 1000]) for i in range(0, FIT, 1000)]
    if implementation == "gradood":

        def run():
            return SHE(model).fit(batches)

    else:

        def run():
            with torch.no_grad():
                return _their_she(model).fit_features(fit, labels)

    benchmark.group = "she-fit-N20000-D2048-C1000"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


def _openood_fdbd(model, train_mean):
    weight = model[1].weight.detach()
    classes = weight.shape[0]
    denominator = torch.cdist(weight, weight)
    denominator.fill_diagonal_(1.0)

    def score(output, feature):
        values, nn_idx = output.max(1)
        logits_sub = (output - values[:, None]).abs()
        return (logits_sub / denominator[nn_idx]).sum(1) / torch.linalg.vector_norm(feature - train_mean, dim=1) / (classes - 1)

    return score


@pytest.mark.parametrize("implementation", ["gradood", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_fdbd_score(benchmark, case, implementation):
    model, fit, _, features = _setup(*CASES[case])
    logits = model(features).detach()
    detector = FDBD(model).fit(fit)
    expected = detector.score_features(logits.double(), features.double())
    if implementation == "gradood":
        detector.score_features(logits, features)  # builds the cached boundary norms

        def run():
            return detector.score_features(logits, features)

    else:
        score = _openood_fdbd(model, fit.mean(0))

        def run():
            return score(logits, features)

    benchmark.group = f"fdbd-score-{case}"
    result = run()
    benchmark.extra_info["max_rel_err_vs_float64"] = float(((result.double() - expected).abs() / expected.abs()).max())
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)
