"""The comparison set's forward detectors (Entropy, GEN, Mahalanobis, Relative
Mahalanobis, KNN) against literal float64 implementations: numpy's explicit inverse
for Mahalanobis, a brute-force sort for KNN; batch invariance, NaN rows, state round
trips, errors, and a Hugging Face model."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import zoo
from gradood.detectors import GEN, KNN, Entropy, Mahalanobis


class _MLP(nn.Module):
    def __init__(self, classes=4, width=6):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, width))
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.body(x))


def _data(samples=120, seed=0):
    torch.manual_seed(seed)
    model = _MLP().double().eval()
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn(samples, 5, generator=generator, dtype=torch.float64)
    labels = torch.arange(samples) % 4
    batches = [(inputs[i : i + 32], labels[i : i + 32]) for i in range(0, samples, 32)]
    return model, inputs, labels, batches


def _features(model, inputs):
    with torch.no_grad():
        return model.body(inputs)


def _numpy_mahalanobis(bank, targets, queries):
    classes = sorted(set(targets.tolist()))
    means = np.stack([bank[targets == c].mean(0) for c in classes])
    centred = bank - means[np.searchsorted(classes, targets)]
    precision = np.linalg.inv(centred.T @ centred / bank.shape[0])
    distances = np.stack([np.einsum("bi,ij,bj->b", queries - m, precision, queries - m) for m in means], 1)
    return distances.min(1)


def _numpy_background(bank, queries):
    mean = bank.mean(0)
    centred = bank - mean
    precision = np.linalg.inv(centred.T @ centred / bank.shape[0])
    return np.einsum("bi,ij,bj->b", queries - mean, precision, queries - mean)


def test_entropy_is_minus_the_shannon_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=generator) * 4
    p = torch.softmax(logits.double(), 1)
    expected = (p * p.log()).sum(1)
    model, inputs, _, _ = _data()
    detector = Entropy(model)
    torch.testing.assert_close(detector.score_features(logits, None), expected)
    special = torch.tensor([[0.0, -math.inf, 1.0], [math.nan, 0.0, 1.0], [2.0, 2.0, 2.0]])
    scores = detector.score_features(special, None)
    p = torch.softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), 0)
    torch.testing.assert_close(scores[0], (p * p.log()).sum())  # the −inf class has p log p = 0
    assert math.isnan(scores[1]) and math.isclose(scores[2], -math.log(3), rel_tol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(detector.score(inputs[:6]), Entropy(model).score_features(model(inputs[:6]), None))


@pytest.mark.parametrize("gap", [10.0, 40.0, 80.0, 700.0])
def test_entropy_of_confident_rows_is_exact(gap):
    """Rows [0, −gap, …]: log_softmax rounds log p_max = −log1p(s) to 0 once s < 1e-16, which
    left out a term as large as the rest over the gap (2.6% at a gap of 40). Against 800-digit
    Decimal arithmetic."""
    import decimal

    decimal.getcontext().prec = 800  # 1 + e^-700 must not round to 1
    logits = torch.tensor([[0.0] + [-gap] * 9, [0.0, -gap, -gap / 2, 3.0 - gap] + [-math.inf] * 6], dtype=torch.float64)
    got = Entropy(_data()[0]).score_features(logits, None)
    for row, value in zip(logits.tolist(), got.tolist()):
        exps = [decimal.Decimal(x).exp() if x != -math.inf else decimal.Decimal(0) for x in row]
        total = sum(exps)
        expected = sum((e / total) * (e / total).ln() for e in exps if e != 0)
        assert value == pytest.approx(float(expected), rel=1e-12, abs=0)


def test_gen_is_its_formula_and_keeps_confident_rows_apart():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 150, generator=generator) * 3
    p = torch.softmax(logits.double(), 1)
    top = p.topk(100, 1).values
    expected = -(top**0.1 * (1 - top) ** 0.1).sum(1)
    model, _, _, _ = _data()
    torch.testing.assert_close(GEN(model).score_features(logits, None), expected, rtol=1e-12, atol=1e-12)
    small = logits[:, :7]
    p = torch.softmax(small.double(), 1)
    torch.testing.assert_close(GEN(model, gamma=0.5, top=3).score_features(small, None),
                               -(p.topk(3, 1).values ** 0.5 * (1 - p.topk(3, 1).values) ** 0.5).sum(1))
    confident = torch.tensor([[40.0, 0.0, 0.0], [45.0, 0.0, 0.0]])  # 1 − p_max rounds to 0 in float64
    scores = GEN(model).score_features(confident, None)
    assert scores[1] > scores[0] and bool(torch.isfinite(scores).all())
    broken = GEN(model).score_features(torch.tensor([[math.inf, 0.0], [math.nan, 1.0], [-math.inf, 0.0]]), None)
    assert bool(broken[:2].isnan().all()) and math.isclose(broken[2], 0.0, abs_tol=1e-300)  # p = (0, 1): GEN 0
    for bad in ({"gamma": 0}, {"gamma": -1.0}, {"top": 0}, {"top": 2.5}):
        with pytest.raises(ValueError, match="gamma|top"):
            GEN(model, **bad)


@pytest.mark.parametrize("relative", [False, True])
def test_mahalanobis_is_the_explicit_inverse_version(relative):
    model, inputs, labels, batches = _data()
    detector = Mahalanobis(model, relative=relative).fit(batches)
    bank = _features(model, inputs).numpy()
    queries = torch.cat([inputs[:5] + 0.3, torch.randn(5, 5, dtype=torch.float64)])
    q = _features(model, queries).numpy()
    distances = _numpy_mahalanobis(bank, labels.numpy(), q)
    expected = -(distances - _numpy_background(bank, q)) if relative else -distances
    np.testing.assert_allclose(detector.score(queries).numpy(), expected, rtol=1e-9, atol=1e-9)
    one_by_one = torch.cat([detector.score(queries[i : i + 1]) for i in range(queries.shape[0])])
    torch.testing.assert_close(one_by_one, detector.score(queries), rtol=1e-10, atol=1e-10)
    buffer = io.BytesIO()
    torch.save(detector.state_dict(), buffer)
    buffer.seek(0)
    restored = Mahalanobis(model, relative=relative).load_state_dict(torch.load(buffer))
    assert torch.equal(restored.score(queries), detector.score(queries))


def test_mahalanobis_with_predicted_classes_and_errors():
    model, inputs, labels, batches = _data()
    with torch.no_grad():
        predicted = model(inputs).argmax(1)
    detector = Mahalanobis(model, classes="predicted").fit(inputs)
    bank = _features(model, inputs).numpy()
    q = _features(model, inputs[:4]).numpy()
    np.testing.assert_allclose(detector.score(inputs[:4]).numpy(), -_numpy_mahalanobis(bank, predicted.numpy(), q),
                               rtol=1e-9)
    with pytest.raises(ValueError, match="fit data give no labels"):
        Mahalanobis(model).fit(inputs)
    with pytest.raises(ValueError, match="singular"):
        Mahalanobis(model).fit([(inputs[:5], labels[:5])])  # 5 samples, 6 feature dimensions
    with pytest.raises(RuntimeError, match="call fit"):
        Mahalanobis(model).score(inputs[:2])
    with pytest.raises(ValueError, match="classes must be one of"):
        Mahalanobis(model, classes="all")


def _brute_force_knn(bank, queries, k):
    normalise = lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)  # noqa: E731
    distances = ((normalise(queries)[:, None, :] - normalise(bank)[None, :, :]) ** 2).sum(2)
    return -np.sort(distances, axis=1)[:, k - 1]


@pytest.mark.parametrize("k", [1, 7, 50])
def test_knn_is_the_brute_force_kth_neighbour(k):
    model, inputs, _, batches = _data()
    detector = KNN(model, neighbours=k).fit(batches)
    queries = torch.cat([inputs[:4] + 0.2, torch.randn(4, 5, dtype=torch.float64)])
    expected = _brute_force_knn(_features(model, inputs).numpy(), _features(model, queries).numpy(), k)
    np.testing.assert_allclose(detector.score(queries).numpy(), expected, rtol=1e-9, atol=1e-12)
    one_by_one = torch.cat([detector.score(queries[i : i + 1]) for i in range(queries.shape[0])])
    torch.testing.assert_close(one_by_one, detector.score(queries))


def test_knn_bank_limits_and_errors():
    model, inputs, _, batches = _data()
    detector = KNN(model, neighbours=3, max_samples=40).fit(batches)
    assert detector.bank.shape == (40, 6)
    expected = _brute_force_knn(_features(model, inputs[:40]).numpy(), _features(model, inputs[:3]).numpy(), 3)
    np.testing.assert_allclose(detector.score(inputs[:3]).numpy(), expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="neighbours=50 needs at least that many"):
        KNN(model).fit(inputs[:10])
    with pytest.raises(ValueError, match="neighbours must be an integer"):
        KNN(model, neighbours=0)
    nan_query = inputs[:2].clone()
    nan_query[1, 0] = math.nan
    scores = detector.score(nan_query)
    assert math.isfinite(scores[0]) and math.isnan(scores[1])


def test_on_a_hugging_face_model():
    model = zoo.hf_vit(num_labels=3)
    batches = [zoo.image_batch(8, generator_seed=seed) for seed in range(3)]
    for detector in (Entropy(model), GEN(model), KNN(model, neighbours=5), Mahalanobis(model, classes="predicted")):
        if isinstance(detector, Mahalanobis):
            with pytest.raises(ValueError, match="singular"):  # 24 samples, 32 feature dimensions
                detector.fit(batches)
            continue
        detector.fit(batches)
        scores = detector.score(zoo.image_batch(4, generator_seed=9))
        assert scores.shape == (4,) and bool(torch.isfinite(scores).all())


def test_the_pseudo_inverse_option_is_numpys_pinv_on_a_dead_feature():
    from gradood import mahalanobis

    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(60, 4, generator=generator, dtype=torch.float64)
    rows = torch.cat([rows, torch.zeros(60, 1, dtype=torch.float64), rows[:, :1] * 2], 1)  # dead and duplicated
    targets = torch.arange(60) % 3
    with pytest.raises(ValueError, match="singular='pseudo-inverse'"):
        mahalanobis.fit_class_gaussians(rows, targets)
    gaussians = mahalanobis.fit_class_gaussians(rows, targets, singular="pseudo-inverse")
    assert gaussians.whitening.shape == (4, 6)
    x, y = rows.numpy(), targets.numpy()
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    centred = x - means[y]
    precision = np.linalg.pinv(centred.T @ centred / 60, hermitian=True)
    queries = torch.randn(5, 6, generator=generator, dtype=torch.float64).numpy()
    expected = -np.stack([np.einsum("bi,ij,bj->b", queries - m, precision, queries - m) for m in means], 1).min(1)
    np.testing.assert_allclose(mahalanobis.mahalanobis_score(torch.from_numpy(queries), gaussians).numpy(), expected,
                               rtol=1e-9)
    with pytest.raises(ValueError, match="singular must be one of"):
        mahalanobis.fit_class_gaussians(rows, targets, singular="ridge")
