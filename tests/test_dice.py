"""DICE (gradood.detectors.DICE) against a literal numpy re-implementation of the paper's
procedure (mean ID feature, np.percentile of the contributions, strict >, energy of the
sparsified head), and against pytorch-ood's DICE where it imports."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import zoo
from helpers import pytorch_ood_detectors
from gradood.detectors import DICE
from gradood.detectors.dice import contribution_percentile


class _Net(nn.Module):
    def __init__(self, width=48, classes=6, bias=True):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, width), nn.ReLU())
        self.fc = nn.Linear(width, classes, bias=bias)

    def forward(self, x):
        return self.fc(self.body(x))


def _literal(model: _Net, fit_inputs: torch.Tensor, inputs: torch.Tensor, percentile: float) -> np.ndarray:
    with torch.no_grad():
        mean = model.body(fit_inputs).double().numpy().mean(0)
        weight = model.fc.weight.double().numpy()
        contributions = mean[None, :] * weight
        masked = np.where(contributions > np.percentile(contributions, percentile), weight, 0.0)
        logits = model.body(inputs).double().numpy() @ masked.T
        if model.fc.bias is not None:
            logits = logits + model.fc.bias.double().numpy()
    top = logits.max(1, keepdims=True)
    return (top + np.log(np.exp(logits - top).sum(1, keepdims=True))).squeeze(1)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("percentile", [0.0, 50.0, 90.0, 99.5])
def test_dice_is_the_papers_procedure(percentile, bias):
    torch.manual_seed(0)
    model = _Net(bias=bias).double().eval()
    fit_inputs, inputs = torch.randn(70, 10, dtype=torch.float64), torch.randn(9, 10, dtype=torch.float64)
    batches = [fit_inputs[i : i + 16] for i in range(0, 70, 16)]  # streamed in uneven batches
    detector = DICE(model, percentile=percentile).fit(batches)
    np.testing.assert_allclose(detector.score(inputs).numpy(), _literal(model, fit_inputs, inputs, percentile),
                               rtol=1e-12, atol=1e-12)
    float32 = DICE(model.float(), percentile=percentile).fit(fit_inputs.float())
    np.testing.assert_allclose(float32.score(inputs.float()).numpy(), _literal(model.double(), fit_inputs, inputs, percentile),
                               rtol=2e-5, atol=2e-5)


def _skewed_detector(dtype, percentile=90.0, classes=70, width=300):
    """A fitted DICE whose classes keep very different numbers of weights: class 0 none at
    p >= 90 (its weights negative against non-negative mean features), class 1 the most (large
    weights on 60 features, fewer than a quarter of them: the pruned_linear path stays open)."""
    generator = torch.Generator().manual_seed(11)
    head = nn.Linear(width, classes).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(classes, width, generator=generator, dtype=dtype))
        head.weight[0] = -head.weight[0].abs()
        head.weight[1, :60] = head.weight[1, :60].abs() * 5
        head.weight[1, 60:] *= 1e-3
    model = nn.Sequential(nn.Identity(), head).eval()
    fit = torch.rand(64, width, generator=generator, dtype=dtype)
    return DICE(model, percentile=percentile).fit(fit), head


def _expected(detector, head, features):
    masked = torch.where(detector.mask, head.weight.detach().double(), torch.zeros((), dtype=torch.float64))
    return torch.logsumexp(features.double() @ masked.T + head.bias.detach().double(), 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("percentile", [90.0, 99.0, 30.0])
@pytest.mark.parametrize("batch", [1, 7, 32, 33, 64, 65, 200])
def test_every_product_path_is_the_sparsified_head(batch, percentile, dtype):
    """CPU: pruned_linear with samples and classes swapped (float32, B > 32, AVX2/AVX-512),
    torch's CSR product, the dense GEMM (p = 30 keeps 70%) against float64; rows scored alone
    agree with the batch (the paths differ in summation order only)."""
    detector, head = _skewed_detector(dtype, percentile)
    counts = detector.mask.sum(1)
    if percentile >= 90:
        assert counts[0] == 0 and counts[1] == int(counts.max()) and 4 * counts[1] <= head.in_features
    generator = torch.Generator().manual_seed(batch)
    features = torch.rand(batch, head.in_features, generator=generator, dtype=dtype) * 2
    features = features[:, ::1] if batch % 2 else features.T.contiguous().T  # non-contiguous rows too
    logits = head(features).detach()
    got = detector.score_features(logits, features)
    tolerance = 1e-12 if dtype == torch.float64 else 3e-6
    torch.testing.assert_close(got.double(), _expected(detector, head, features), rtol=tolerance, atol=tolerance)
    alone = torch.cat([detector.score_features(logits[i : i + 1], features[i : i + 1]) for i in range(batch)])
    torch.testing.assert_close(alone, got, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("batch", [5, 40])
def test_non_finite_features_score_nan_on_every_path(batch):
    detector, head = _skewed_detector(torch.float32, 95.0)
    never_kept = int((~detector.mask.any(0)).nonzero()[0])  # a feature no class keeps
    features = torch.rand(batch, head.in_features, generator=torch.Generator().manual_seed(1))
    features[0, never_kept] = math.nan
    features[1, never_kept] = math.inf
    features[2, 0] = -math.inf
    got = detector.score_features(head(features).detach(), features)
    assert got[:3].isnan().all()
    torch.testing.assert_close(got[3:].double(), _expected(detector, head, features[3:]), rtol=3e-6, atol=3e-6)


def test_the_percentile_is_numpys_linear_interpolation():
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(37, 11, generator=generator, dtype=torch.float64)
    values[0, :5] = 0.5  # ties
    for percentile in (0.0, 1.0, 33.3, 50.0, 90.0, 99.9):
        assert contribution_percentile(values, percentile) == np.percentile(values.numpy(), percentile)


def test_a_tied_block_at_the_percentile_is_kept_as_numpy_keeps_it():
    """C·D = 91 at p = 70: the textbook position (n − 1)·p = 63 is whole, numpy's is 63 − 1e-15,
    so numpy's threshold falls just below the tied block of ones and keeps all 28 of them;
    the textbook threshold equals them and the strict > dropped every one (review)."""
    head = nn.Linear(13, 7).double()
    with torch.no_grad():
        head.weight.copy_(torch.cat([torch.zeros(63), torch.ones(28)]).reshape(7, 13))
        head.bias.zero_()
    model = nn.Sequential(nn.Identity(), head).eval()
    detector = DICE(model, percentile=70).fit(torch.ones(4, 13, dtype=torch.float64))
    assert int(detector.mask.sum()) == 28
    inputs = torch.rand(3, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.logsumexp(inputs @ head.weight.T, 1)
    torch.testing.assert_close(detector.score(inputs), expected)


def test_state_round_trip_and_errors():
    torch.manual_seed(1)
    model = _Net().double().eval()
    inputs = torch.randn(30, 10, dtype=torch.float64)
    detector = DICE(model).fit(inputs)
    fresh = DICE(model).load_state_dict(detector.state_dict())
    torch.testing.assert_close(fresh.score(inputs), detector.score(inputs))
    with pytest.raises(RuntimeError, match="call fit"):
        DICE(model).score(inputs)
    with pytest.raises(ValueError, match=r"percentile must be a number in \[0, 100\)"):
        DICE(model, percentile=100)
    broken = inputs.clone()
    broken[3, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        DICE(model).fit(broken)
    with pytest.raises(ValueError, match="the fitted mask is"):
        DICE(_Net(classes=4).double().eval()).load_state_dict(detector.state_dict()).score(inputs)


def test_on_a_hugging_face_model():
    model = zoo.hf_vit(num_labels=3)
    batches = [zoo.image_batch(8, generator_seed=seed) for seed in range(2)]
    scores = DICE(model, percentile=70).fit(batches).score(zoo.image_batch(4, generator_seed=9))
    assert scores.shape == (4,) and bool(torch.isfinite(scores).all())


def test_matches_pytorch_ood():
    detector_module = pytorch_ood_detectors()
    torch.manual_seed(2)
    model = _Net().double().eval()
    fit_inputs, inputs = torch.randn(50, 10, dtype=torch.float64), torch.randn(7, 10, dtype=torch.float64)
    theirs = detector_module.DICE(model=model.body, w=model.fc.weight, b=model.fc.bias, p=90.0)
    with torch.no_grad():
        theirs.fit_features(model.body(fit_inputs), torch.zeros(50, dtype=torch.long))
        expected = -theirs.predict(inputs)  # pytorch-ood's scores are OOD-high
    torch.testing.assert_close(DICE(model, percentile=90).fit(fit_inputs).score(inputs), expected)


def test_the_cached_sparse_head_follows_refits_and_in_place_weight_changes():
    torch.manual_seed(4)
    model = _Net().double().eval()
    fit_a, fit_b, inputs = (torch.randn(40, 10, dtype=torch.float64) for _ in range(3))
    detector = DICE(model, percentile=60).fit(fit_a)
    detector.score(inputs)
    detector.fit(fit_b * 3)  # a new mask
    np.testing.assert_allclose(detector.score(inputs).numpy(), _literal(model, fit_b * 3, inputs, 60), rtol=1e-12)
    with torch.no_grad():
        model.fc.weight.mul_(2.0)  # in place: the same tensor, a new version
    expected = DICE(model, percentile=60)
    expected.load_state_dict(detector.state_dict())
    torch.testing.assert_close(detector.score(inputs), expected.score(inputs))


@pytest.mark.parametrize("percentile, batch, dtype", [(60.0, 6, torch.float64), (95.0, 6, torch.float64),
                                                     (95.0, 40, torch.float32)], ids=["dense", "csr", "pruned_linear"])
def test_the_sparse_head_is_built_once_while_the_weight_is_unchanged(monkeypatch, percentile, batch, dtype):
    from gradood.detectors import dice

    torch.manual_seed(5)
    model = _Net(width=256, classes=12).to(dtype).eval()
    fit, inputs = torch.randn(40, 10, dtype=dtype), torch.randn(batch, 10, dtype=dtype)
    detector = DICE(model, percentile=percentile).fit(fit)
    built = []
    for name in ("_dense", "_csr", "_padded", "_layout"):
        original = getattr(dice, name)
        monkeypatch.setattr(dice, name, lambda *args, _f=original, _n=name: built.append(_n) or _f(*args))
    first = detector.score(inputs)
    forms = list(built)
    from gradood._ops import cpu_capability

    fast = cpu_capability() in ("AVX2", "AVX512")
    path = {60.0: "_dense", 95.0: "_padded" if batch > 32 and fast else "_csr"}[percentile]
    assert path in forms
    for _ in range(3):
        torch.testing.assert_close(detector.score(inputs), first, rtol=0, atol=0)
    assert built == forms  # nothing rebuilt
    model.fc.weight = nn.Parameter(model.fc.weight.detach() * 3)  # a replaced parameter: rebuilt
    with torch.no_grad():
        masked = torch.where(detector.mask, model.fc.weight, torch.zeros((), dtype=dtype))
        expected = torch.logsumexp(model.body(inputs).double() @ masked.double().T + model.fc.bias.double(), 1)
    built.clear()
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(detector.score(inputs).double(), expected, rtol=tolerance, atol=0)
    assert built == forms
    assert not torch.allclose(expected, first.double())


@pytest.mark.parametrize("batch", [5, 40])
def test_features_that_require_a_gradient_take_the_differentiable_product(batch):
    detector, head = _skewed_detector(torch.float32, 95.0)
    base = torch.rand(batch, head.in_features, generator=torch.Generator().manual_seed(2))
    features = base.clone().requires_grad_(True)
    got = torch.autograd.grad(detector.score_features(head(features).detach(), features).sum(), features)[0]
    literal = base.double().requires_grad_(True)
    expected = torch.autograd.grad(_expected(detector, head, literal).sum(), literal)[0]
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
