"""SHE and fDBD (gradood.detectors.SHE, .FDBD) against literal float64 re-implementations of
the papers' procedures (SHE: pytorch-ood's, per class mean of the correctly classified
features; fDBD: OpenOOD's loop over classes for the weight differences' norms), and their
degenerate cases: classes without a pattern, identical head rows, tied logits, NaN rows."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import zoo
from helpers import pytorch_ood_detectors
from gradood.detectors import FDBD, SHE
from gradood.detectors import fdbd as fdbd_module


class _Net(nn.Module):
    def __init__(self, width=12, classes=4, bias=True):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, width), nn.ReLU())
        self.fc = nn.Linear(width, classes, bias=bias)

    def forward(self, x):
        return self.fc(self.body(x))


def _data(n=80, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 6, generator=generator, dtype=dtype)
    labels = torch.randint(0, 4, (n,), generator=generator)
    return inputs, labels


def _fitted_model(dtype=torch.float64, bias=True):
    """A net trained briefly so that it gets most of the fit data right (and some wrong)."""
    torch.manual_seed(0)
    model = _Net(bias=bias).to(dtype)
    inputs, _ = _data(200, 1, dtype)
    labels = (inputs[:, 0] > 0).long() + 2 * (inputs[:, 1] > 0).long()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(60):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimiser.step()
    return model.eval(), inputs, labels


def _she_literal(model, fit_inputs, fit_labels, inputs, use_labels=True):
    with torch.no_grad():
        v, f = model.body(fit_inputs).double().numpy(), model(fit_inputs).double().numpy()
        predicted = f.argmax(1)
        target = fit_labels.numpy() if use_labels else predicted
        keep = predicted == target
        patterns = np.stack([v[keep & (target == c)].mean(0) for c in range(f.shape[1])])
        test_v, test_f = model.body(inputs).double().numpy(), model(inputs).double().numpy()
    return (test_v * patterns[test_f.argmax(1)]).sum(1)


@pytest.mark.parametrize("classes", ["labels", "predicted"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_she_is_the_papers_procedure(classes, dtype):
    model, fit_inputs, fit_labels = _fitted_model(dtype)
    inputs, _ = _data(17, 5, dtype)
    batches = [(fit_inputs[i : i + 32], fit_labels[i : i + 32]) for i in range(0, 200, 32)]  # streamed
    detector = SHE(model, classes=classes).fit(batches)
    expected = _she_literal(copy.deepcopy(model).double(), fit_inputs.double(), fit_labels, inputs.double(), classes == "labels")
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    np.testing.assert_allclose(detector.score(inputs).double().numpy(), expected, rtol=tolerance, atol=tolerance)
    parts = torch.cat([detector.score(inputs[:5]), detector.score(inputs[5:])])
    torch.testing.assert_close(parts, detector.score(inputs), rtol=tolerance, atol=tolerance)  # batch-invariant


def test_she_matches_pytorch_ood():
    detector_module = pytorch_ood_detectors()
    model, fit_inputs, fit_labels = _fitted_model()
    inputs, _ = _data(9, 6)
    theirs = detector_module.SHE(backbone=model.body, head=model.fc)
    with torch.no_grad():
        theirs.fit_features(model.body(fit_inputs), fit_labels)
        expected = -theirs.predict(inputs)  # pytorch-ood's scores are OOD-high
    torch.testing.assert_close(SHE(model).fit([(fit_inputs, fit_labels)]).score(inputs), expected)


def test_she_refuses_classes_without_a_pattern_and_isolates_nan_rows():
    model, fit_inputs, fit_labels = _fitted_model()
    predicted = model(fit_inputs).argmax(1)
    wrong_for_three = torch.where(predicted == 3, torch.zeros_like(fit_labels), predicted)  # class 3 never right
    with pytest.raises(ValueError, match=r"class\(es\) 3 \(1 of 4\) have no correctly classified fit sample"):
        SHE(model).fit([(fit_inputs, wrong_for_three)])
    with pytest.raises(ValueError, match="the fit data give no labels"):
        SHE(model).fit(fit_inputs)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\) \(the model's classes\), got 4..7"):
        SHE(model).fit([(fit_inputs, fit_labels + 4)])
    negative = fit_labels.clone()
    negative[0] = -1  # a sample that could never be counted, not silently dropped
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        SHE(model).fit([(fit_inputs, negative)])
    for bad in (math.inf, -math.inf, math.nan):
        floats = fit_labels.double()
        floats[1] = bad
        with pytest.raises(ValueError, match="labels must be class indices, got non-integer or non-finite values"):
            SHE(model).fit([(fit_inputs, floats)])
    detector = SHE(model).fit([(fit_inputs, fit_labels)])
    logits, features = detector.forward_features(fit_inputs[:5])
    logits[2, 1] = math.nan
    scores = detector.score_features(logits, features)
    assert scores[2].isnan() and torch.isfinite(scores[[0, 1, 3, 4]]).all()
    fresh = SHE(model).load_state_dict(detector.state_dict())
    torch.testing.assert_close(fresh.score(fit_inputs), detector.score(fit_inputs))


def _fdbd_literal(model, fit_inputs, inputs, normalizer="distance"):
    """OpenOOD's postprocessor in float64 numpy, divided by C − 1 (the paper's mean)."""
    with torch.no_grad():
        train_mean = model.body(fit_inputs).double().numpy().mean(0)
        w = model.fc.weight.double().numpy()
        feature, output = model.body(inputs).double().numpy(), model(inputs).double().numpy()
    classes = w.shape[0]
    denominator_matrix = np.zeros((classes, classes))
    for p in range(classes):
        denominator = np.linalg.norm(w - w[p, :], axis=1)
        denominator[p] = 1
        denominator_matrix[p, :] = denominator
    nn_idx = output.argmax(1)
    logits_sub = np.abs(output - output.max(1)[:, None])
    normaliser = feature - train_mean if normalizer == "distance" else feature
    return (logits_sub / denominator_matrix[nn_idx]).sum(1) / np.linalg.norm(normaliser, axis=1) / (classes - 1)


@pytest.mark.parametrize("normalizer", ["distance", "norm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fdbd_is_the_papers_procedure(normalizer, dtype):
    model, fit_inputs, _ = _fitted_model(dtype)
    inputs, _ = _data(23, 7, dtype)
    detector = FDBD(model, normalizer=normalizer).fit([fit_inputs[:90], fit_inputs[90:]])
    expected = _fdbd_literal(copy.deepcopy(model).double(), fit_inputs.double(), inputs.double(), normalizer)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(detector.score(inputs).double().numpy(), expected, rtol=tolerance, atol=tolerance)


def test_fdbd_distances_are_exact_where_head_rows_nearly_coincide(monkeypatch):
    """Two classes whose weights differ by 1e-7 of their norm: the Gram form cancels there and
    the differences are used; the uncached path (C > 4096) gives the cached one's scores."""
    model, fit_inputs, _ = _fitted_model()
    with torch.no_grad():
        model.fc.weight[1] = model.fc.weight[0] * (1 + 1e-7)
    inputs, _ = _data(30, 8)
    detector = FDBD(model).fit(fit_inputs)
    expected = _fdbd_literal(model, fit_inputs, inputs)
    got = detector.score(inputs)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)
    monkeypatch.setattr(fdbd_module, "_CACHED_CLASSES", 2)
    torch.testing.assert_close(FDBD(model).fit(fit_inputs).score(inputs), got, rtol=1e-12, atol=0)


def test_fdbd_degenerate_cases():
    model, fit_inputs, _ = _fitted_model()
    detector = FDBD(model).fit(fit_inputs)
    logits, features = detector.forward_features(fit_inputs[:6])
    tied = torch.zeros_like(logits)  # on every boundary at once
    assert (detector.score_features(tied, features) == 0).all()
    at_mean = detector.mean_features[None, :].expand(6, -1).clone()
    assert torch.isinf(detector.score_features(logits, at_mean)).all()
    broken = logits.clone()
    broken[3, 0] = math.nan
    scores = detector.score_features(broken, features)
    assert scores[3].isnan() and torch.isfinite(scores[[0, 1, 2, 4, 5]]).all()
    assert FDBD(model, normalizer="norm").score(fit_inputs[:2]).shape == (2,)  # needs no fit
    with torch.no_grad():
        model.fc.weight[2] = model.fc.weight[0]
    twin = FDBD(model).fit(fit_inputs)
    with pytest.raises(ValueError, match=r"classes \d and \d have identical weights"):
        twin.score(fit_inputs)
    with pytest.raises(ValueError, match="normalizer must be one of"):
        FDBD(model, normalizer="l2")
    with pytest.raises(RuntimeError, match="call fit"):
        FDBD(model).score(fit_inputs)


def test_on_hugging_face_models():
    model = zoo.hf_deit_distilled(num_labels=3)  # two averaged heads: W = [W1 W2], v = [v1; v2] / 2
    batches = [zoo.image_batch(6, generator_seed=seed) for seed in range(2)]
    inputs = zoo.image_batch(4, generator_seed=9)
    fdbd = FDBD(model).fit(batches)
    scores = fdbd.score(inputs)
    assert scores.shape == (4,) and bool(torch.isfinite(scores).all())
    weight, bias = fdbd.head_weight_bias()
    logits, features = fdbd.forward_features(inputs)
    torch.testing.assert_close(logits, features @ weight.T + bias, rtol=1e-5, atol=1e-5)
    convnext = zoo.hf_convnext(num_labels=3)  # its random weights predict every class
    fit = [zoo.image_batch(16, generator_seed=seed) for seed in range(4)]
    she = SHE(convnext, classes="predicted").fit(fit)
    logits, features = she.forward_features(inputs)
    expected = (features.double() * she.patterns[logits.argmax(1)]).sum(1).float()
    torch.testing.assert_close(she.score(inputs), expected)


def _fdbd_of(logits, features, weight, mean):
    """The formula in float64 numpy on given logits and features (no overflow there)."""
    f, v, w = logits.double().numpy(), features.double().numpy(), weight.double().numpy()
    top = f.argmax(1)
    norms = np.linalg.norm(w[top][:, None, :] - w[None, :, :], axis=2)
    norms[np.arange(len(top)), top] = 1.0
    distance = ((f[np.arange(len(top)), top][:, None] - f) / norms).sum(1) / (w.shape[0] - 1)
    return distance / np.linalg.norm(v - mean.double().numpy(), axis=1)


def test_fdbd_rows_past_the_float32_range_and_infinite_logits():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 100)).eval()
    fit_inputs = torch.randn(64, 6)
    detector = FDBD(model).fit(fit_inputs)
    logits, features = detector.forward_features(torch.randn(8, 6))
    weight = model[2].weight.detach()
    huge_logits = logits * 1e36  # gaps ~1e37: the float32 class sum of 99 of them overflows
    got = detector.score_features(huge_logits, features)
    np.testing.assert_allclose(got.double().numpy(), _fdbd_of(huge_logits, features, weight, detector.mean_features),
                               rtol=2e-5)
    huge_features = features * 1e21  # ‖v − μ‖² overflows float32
    got = detector.score_features(logits, huge_features)
    expected = _fdbd_of(logits, huge_features, weight, detector.mean_features)
    assert (expected > 1e-30).all()
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=2e-5)
    infinite = logits.clone()
    infinite[0, 5] = math.inf  # infinitely far from every boundary of its class
    infinite[1, 7] = -math.inf  # infinitely far from one boundary
    infinite[2, 3] = infinite[2, 4] = math.inf  # two infinite maxima: no defined gap
    got = detector.score_features(infinite, features)
    assert got[0] == math.inf and got[1] == math.inf and got[2].isnan()
    torch.testing.assert_close(got[3:], detector.score_features(logits, features)[3:], rtol=0, atol=0)
