"""LowDimGrad against a literal implementation on a small CNN in float64:
per-sample gradients by a backward loop, explicit normalisation, explicit SVD of
the N×|θ| matrix, brute-force numpy KNN."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from gradood import knn
from gradood.detectors import LowDimGrad, ReAct
from test_persample_gradients import _flat, _loop_grads


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def _model_and_data(samples: int, seed: int = 0):
    torch.manual_seed(seed)
    model = _CNN().double().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 1.5)
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn(samples, 1, 6, 6, generator=generator, dtype=torch.float64)
    labels = torch.arange(samples) % 3
    return model, inputs, labels


def _batches(inputs, labels, size=7):
    return [(inputs[i : i + size], labels[i : i + size]) for i in range(0, inputs.shape[0], size)]


class _Literal:
    """The method written out: dense per-sample gradients, explicit z, σ, SVD."""

    def __init__(self, model, inputs, names=None):
        grads = _loop_grads(model, inputs, names=names)
        self.names = names or [n for n, _ in model.named_parameters()]
        self.dense = _flat(grads, self.names)
        self.mean = self.dense.mean(0)
        std = self.dense.std(0, unbiased=False)
        # Round-off-level spread counts as none, relative to each parameter tensor's scale.
        sizes = [grads[n][0].numel() for n in self.names]
        scale = torch.cat([torch.full((k,), float((m.square() + s.square()).mean().sqrt()), dtype=torch.float64)
                           for k, m, s in zip(sizes, self.mean.split(sizes), std.split(sizes))])
        self.varies = std > 64 * torch.finfo(torch.float64).eps * (self.mean.abs() + scale)
        self.inv_std = torch.where(self.varies, 1 / torch.where(self.varies, std, torch.ones_like(std)), torch.zeros_like(std))
        self.normalised = (self.dense - self.mean) * self.inv_std

    def normalise(self, model, inputs):
        return (_flat(_loop_grads(model, inputs, names=self.names), self.names) - self.mean) * self.inv_std

    def pca(self, k):
        _, values, vh = torch.linalg.svd(self.normalised, full_matrices=False)
        return vh[:k].T, values[:k] ** 2 / self.dense.shape[0]

    def class_means(self, labels, classes):
        columns = torch.stack([self.normalised[labels == c].mean(0) for c in range(classes)], 1)
        return columns / columns.norm(dim=0)


def _directions(detector, names):
    blocks = detector.subspace.directions()
    return torch.cat([blocks[n].double().reshape(detector.subspace.dim, -1) for n in names], 1).T


def _assert_equal_up_to_sign(actual, expected, atol):
    signs = torch.sign((actual * expected).sum(0))
    torch.testing.assert_close(actual * signs, expected, rtol=0, atol=atol)


def _brute_force_knn(queries, bank, k):
    normalise = lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)  # noqa: E731
    q, b = normalise(queries), normalise(bank)
    distances = ((q[:, None, :] - b[None, :, :]) ** 2).sum(2)
    return -np.sort(distances, axis=1)[:, k - 1]


@pytest.fixture(scope="module")
def exact_case():
    """N = 12 samples, K + oversample = 12 ≥ rank(X) = 11: the iteration is exact."""
    model, inputs, labels = _model_and_data(12)
    detector = LowDimGrad(model, dim=3, oversample=9, iterations=2, neighbours=2).fit(_batches(inputs, labels))
    return model, inputs, labels, detector, _Literal(model, inputs)


def test_moments_match_the_literal_normalisation(exact_case):
    model, _, _, detector, literal = exact_case
    mean = torch.cat([detector.subspace.mean[n].double() for n in literal.names])
    inv_std = torch.cat([detector.subspace.inv_std[n].double() for n in literal.names])
    torch.testing.assert_close(mean, literal.mean, rtol=0, atol=1e-14)
    assert torch.equal(inv_std > 0, literal.varies)
    torch.testing.assert_close(inv_std, literal.inv_std, rtol=1e-10, atol=0)


def test_pca_subspace_and_projection_match_the_svd(exact_case):
    model, inputs, _, detector, literal = exact_case
    expected_v, expected_values = literal.pca(3)
    cosines = torch.linalg.svdvals(expected_v.T @ _directions(detector, literal.names))
    torch.testing.assert_close(cosines, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(detector.fit_info["eigenvalues"], expected_values, rtol=1e-10, atol=0)
    _assert_equal_up_to_sign(detector.low_dimensional_gradients(inputs), literal.normalised @ expected_v, atol=1e-9)


def test_knn_scores_match_brute_force_numpy(exact_case):
    model, inputs, _, detector, literal = exact_case
    expected_v, _ = literal.pca(3)
    queries = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    bank = (literal.normalised @ expected_v).numpy()
    expected = _brute_force_knn((literal.normalise(model, queries) @ expected_v).numpy(), bank, 2)
    np.testing.assert_allclose(detector.score(queries).numpy(), expected, rtol=0, atol=1e-10)


def test_pca_converges_with_iterations():
    model, inputs, labels = _model_and_data(60)
    literal = _Literal(model, inputs)
    expected_v, _ = literal.pca(4)
    sines = []
    for iterations in (2, 12):
        detector = LowDimGrad(model, dim=4, oversample=6, iterations=iterations).fit(_batches(inputs, labels, 16))
        cosines = torch.linalg.svdvals(expected_v.T @ _directions(detector, literal.names))
        sines.append(float((1 - cosines.min() ** 2).clamp_min(0).sqrt()))
    assert sines[1] < sines[0] and sines[1] < 1e-2, sines
    assert detector.fit_info["subspace_change"] < 1e-2


def test_class_subspace_matches_the_literal_class_means():
    model, inputs, labels = _model_and_data(15)
    literal = _Literal(model, inputs)
    detector = LowDimGrad(model, subspace="class", neighbours=3).fit(_batches(inputs, labels))
    expected = literal.class_means(labels, 3)
    torch.testing.assert_close(_directions(detector, literal.names), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(detector.low_dimensional_gradients(inputs), literal.normalised @ expected, rtol=0, atol=1e-10)
    queries = inputs[:4] + 0.3
    bank = (literal.normalised @ expected).numpy()
    expected_scores = _brute_force_knn((literal.normalise(model, queries) @ expected).numpy(), bank, 3)
    np.testing.assert_allclose(detector.score(queries).numpy(), expected_scores, rtol=0, atol=1e-10)


def test_class_subspace_from_predictions_and_missing_classes():
    model, inputs, labels = _model_and_data(15)
    predicted = model(inputs).argmax(1)
    if len(predicted.unique()) == 3:
        detector = LowDimGrad(model, subspace="class", classes="predicted").fit(inputs)
        literal = _Literal(model, inputs)
        torch.testing.assert_close(_directions(detector, literal.names), literal.class_means(predicted, 3), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no ID sample of class"):
        LowDimGrad(model, subspace="class").fit(_batches(inputs, torch.zeros_like(labels)))
    with pytest.raises(ValueError, match="give no labels"):
        LowDimGrad(model, subspace="class").fit([inputs[:7], inputs[7:]])


def test_ensemble_adds_a_times_react_energy():
    model, inputs, labels = _model_and_data(20)
    data = _batches(inputs, labels)
    plain = LowDimGrad(model, dim=3).fit(data)
    ensemble = LowDimGrad(model, dim=3, ensemble=True, a=0.7, react_percentile=80).fit(data)
    react = ReAct(model, percentile=80).fit(data)
    assert ensemble.clip == pytest.approx(react.clip)
    queries = inputs[:6] * 1.5
    torch.testing.assert_close(ensemble.score(queries), plain.score(queries) + 0.7 * react.score(queries), rtol=0, atol=1e-9)
    parts = ensemble.score_parts(queries)
    torch.testing.assert_close(parts["knn"], plain.score(queries), rtol=0, atol=1e-12)
    torch.testing.assert_close(parts["react_energy"], react.score(queries), rtol=0, atol=1e-12)
    assert set(plain.score_parts(queries)) == {"knn"}


def test_cosine_metric_ranks_like_squared_l2():
    model, inputs, labels = _model_and_data(20)
    data = _batches(inputs, labels)
    l2 = LowDimGrad(model, dim=3, neighbours=4).fit(data)
    cosine = LowDimGrad(model, dim=3, neighbours=4, metric="cosine").fit(data)
    queries = torch.randn(8, 1, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(cosine.score(queries), 1 + l2.score(queries) / 2, rtol=0, atol=1e-9)


def test_fit_is_reproducible_and_independent_of_the_data_order():
    model, inputs, labels = _model_and_data(12)
    first = LowDimGrad(model, dim=3, oversample=9, iterations=2).fit(_batches(inputs, labels))
    again = LowDimGrad(model, dim=3, oversample=9, iterations=2).fit(_batches(inputs, labels))
    assert torch.equal(first.bank, again.bank)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    shuffled = LowDimGrad(model, dim=3, oversample=9, iterations=2).fit(_batches(inputs[order], labels[order], 5))
    names = [n for n, _ in model.named_parameters()]
    cosines = torch.linalg.svdvals(_directions(first, names).T @ _directions(shuffled, names))
    torch.testing.assert_close(cosines, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)
    queries = inputs[:3] - 0.2
    torch.testing.assert_close(first.score(queries), shuffled.score(queries), rtol=0, atol=1e-6)


def test_state_dict_round_trip_through_torch_save():
    model, inputs, labels = _model_and_data(20)
    detector = LowDimGrad(model, dim=3, ensemble=True).fit(_batches(inputs, labels))
    detector.calibrate(detector.score(inputs))
    buffer = io.BytesIO()
    torch.save(detector.state_dict(), buffer)
    buffer.seek(0)
    restored = LowDimGrad(model, dim=3, ensemble=True).load_state_dict(torch.load(buffer))  # weights_only loading
    queries = inputs[:5] + 0.1
    assert torch.equal(restored.score(queries), detector.score(queries))
    assert restored.threshold == detector.threshold
    assert torch.equal(restored.to("cpu").score(queries), detector.score(queries))


def test_a_state_fitted_on_other_parameters_or_settings_is_refused():
    model, inputs, labels = _model_and_data(20)
    state = LowDimGrad(model, dim=3, params=["fc.weight", "fc.bias"]).fit(_batches(inputs, labels)).state_dict()
    with pytest.raises(ValueError, match="subspace is over other parameters"):
        LowDimGrad(model, dim=3).load_state_dict(state)  # all parameters
    with pytest.raises(ValueError, match="saved with dim=3"):
        LowDimGrad(model, dim=4, params=["fc.weight", "fc.bias"]).load_state_dict(state)
    LowDimGrad(model, dim=3, params=["fc.weight", "fc.bias"]).load_state_dict(state)


def test_half_precision_storage_is_close_to_float32():
    model, inputs, labels = _model_and_data(20)
    model, inputs = model.float(), inputs.float()
    data = _batches(inputs, labels)
    full = LowDimGrad(model, dim=4).fit(data)
    half = LowDimGrad(model, dim=4, dtype=torch.bfloat16).fit(data)
    assert all(block.dtype == torch.bfloat16 for block in half.subspace.scaled_directions.values())
    low_full, low_half = full.low_dimensional_gradients(inputs), half.low_dimensional_gradients(inputs)
    torch.testing.assert_close(low_half, low_full, rtol=0, atol=2e-2 * float(low_full.abs().max()))


def test_restricted_parameters_and_max_samples():
    model, inputs, labels = _model_and_data(20)
    detector = LowDimGrad(model, dim=4, params=["fc.weight", "fc.bias"], max_samples=13).fit(_batches(inputs, labels))
    assert set(detector.subspace.scaled_directions) == {"fc.weight", "fc.bias"}
    assert detector.bank.shape == (13, 4) and detector.fit_info["samples"] == 13
    literal = _Literal(model, inputs[:13], names=["fc.weight", "fc.bias"])
    cosines = torch.linalg.svdvals(literal.pca(4)[0].T @ _directions(detector, literal.names))
    assert float(cosines.min()) > 1 - 1e-4


def test_progress_is_reported(capsys):
    model, inputs, labels = _model_and_data(12)
    LowDimGrad(model, dim=2, iterations=1, progress=True).fit(_batches(inputs, labels))
    err = capsys.readouterr().err
    assert "gradient moments: 12 samples" in err and "gradient PCA, iteration 1/1" in err and "ID G_low" not in err
    LowDimGrad(model, subspace="class", progress=True).fit(_batches(inputs, labels))
    assert "ID G_low: 12 samples" in capsys.readouterr().err


def test_the_pca_bank_from_the_last_pass_equals_projecting_the_fit_data(exact_case):
    model, inputs, _, detector, _ = exact_case
    expected = knn.normalise_rows(detector.low_dimensional_gradients(inputs))
    torch.testing.assert_close(detector.bank, expected, rtol=0, atol=1e-10)


def test_the_model_is_left_untouched():
    model, inputs, labels = _model_and_data(12)
    model.train()
    before = copy.deepcopy(model.state_dict())
    detector = LowDimGrad(model, dim=2, ensemble=True).fit(_batches(inputs, labels))
    detector.score(inputs[:3])
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_errors():
    model, inputs, labels = _model_and_data(12)
    with pytest.raises(ValueError, match="subspace must be one of"):
        LowDimGrad(model, subspace="svd")
    with pytest.raises(ValueError, match="leave dim unset"):
        LowDimGrad(model, subspace="class", dim=3)
    with pytest.raises(ValueError, match="neighbours must be an integer"):
        LowDimGrad(model, neighbours=0)
    with pytest.raises(ValueError, match="metric must be one of"):
        LowDimGrad(model, metric="l1")
    with pytest.raises(ValueError, match="dtype"):
        LowDimGrad(model, dtype=torch.int8)
    with pytest.raises(TypeError, match="one-shot iterator"):
        LowDimGrad(model, dim=2).fit(iter(_batches(inputs, labels)))
    with pytest.raises(ValueError, match="needs more than 12 ID samples"):
        LowDimGrad(model, dim=12).fit(inputs)
    with pytest.raises(ValueError, match="exceeds the 3 selected parameters"):
        LowDimGrad(model, dim=4, params=["fc.bias"]).fit(inputs)
    with pytest.raises(ValueError, match="hold no batch"):
        LowDimGrad(model, dim=2).fit([])
    with pytest.raises(RuntimeError, match="call fit"):
        LowDimGrad(model).score(inputs)
    with pytest.raises(NotImplementedError, match="use score"):
        LowDimGrad(model).score_features(torch.zeros(2, 3), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="neighbours=20 needs at least that many fit samples"):
        LowDimGrad(model, dim=2, neighbours=20).fit(inputs)  # found at fit, not at every score
    plain = LowDimGrad(model, dim=2).fit(inputs)
    plain.ensemble = "react"
    with pytest.raises(RuntimeError, match="fitted without ensemble"):
        plain.score(inputs[:2])


def test_a_shuffling_dataloader_fits_the_same_subspace():
    model, inputs, labels = _model_and_data(12)
    dataset = torch.utils.data.TensorDataset(inputs, labels)
    ordered = LowDimGrad(model, dim=3, oversample=9, iterations=2).fit(torch.utils.data.DataLoader(dataset, batch_size=5))
    shuffled = LowDimGrad(model, dim=3, oversample=9, iterations=2).fit(
        torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(1))
    )
    names = [n for n, _ in model.named_parameters()]
    cosines = torch.linalg.svdvals(_directions(ordered, names).T @ _directions(shuffled, names))
    torch.testing.assert_close(cosines, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)


def test_non_finite_rows_affect_only_themselves_and_fit_refuses_them():
    model, inputs, labels = _model_and_data(12)
    detector = LowDimGrad(model, dim=2).fit(inputs)
    queries = inputs[:4].clone()
    clean = detector.score(queries)
    queries[1, 0, 0, 0] = float("nan")
    scores = detector.score(queries)
    assert torch.isnan(scores[1])
    torch.testing.assert_close(scores[[0, 2, 3]], clean[[0, 2, 3]], rtol=0, atol=1e-12)
    poisoned = inputs.clone()
    poisoned[3, 0, 2, 2] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        LowDimGrad(model, dim=2).fit(poisoned)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_float32_matches_the_float64_literal():
    model, inputs, labels = _model_and_data(12)
    literal = _Literal(model, inputs)
    cuda_model = copy.deepcopy(model).float().cuda()
    detector = LowDimGrad(cuda_model, dim=3, oversample=9, iterations=2).fit(_batches(inputs.float(), labels))
    assert detector.bank.is_cuda
    expected_v, _ = literal.pca(3)
    cosines = torch.linalg.svdvals(expected_v.T @ _directions(detector, literal.names).cpu())
    torch.testing.assert_close(cosines, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-3)
    low = detector.low_dimensional_gradients(inputs.float().cuda()).double().cpu()
    _assert_equal_up_to_sign(low, literal.normalised @ expected_v, atol=1e-3 * float(low.abs().max()))


@pytest.mark.parametrize("name", ["vit", "sequence"])
def test_attention_broadcast_and_embedding_models_match_the_literal(name):
    """Every rule's gradients (MultiheadAttention, broadcast class token and position
    embedding, Embedding with padding, Conv1d, GroupNorm, LayerNorm) through the method."""
    from test_persample import _float64, _vit

    if name == "vit":
        model, _ = _vit()
        inputs = torch.randn(14, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        options = {"functional_params": "broadcast"}
    else:
        model, _ = _float64("sequence")
        inputs = torch.randint(0, 11, (14, 9), generator=torch.Generator().manual_seed(5))
        options = {}
    literal = _Literal(model, inputs)
    detector = LowDimGrad(model, dim=3, oversample=11, iterations=2, neighbours=2, **options).fit(inputs)
    expected_v, _ = literal.pca(3)
    cosines = torch.linalg.svdvals(expected_v.T @ _directions(detector, literal.names))
    torch.testing.assert_close(cosines, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-9)
    _assert_equal_up_to_sign(detector.low_dimensional_gradients(inputs), literal.normalised @ expected_v, atol=1e-8)
    if name == "vit":  # the key bias's gradient is zero (softmax ignores a shift of every score): not normalised noise
        inv_std = detector.subspace.inv_std["attention.in_proj_bias"]
        assert bool((inv_std[8:16] == 0).all()) and bool((inv_std[:8] > 0).all()) and bool((inv_std[16:] > 0).all())


@pytest.mark.parametrize("options", [{"dim": 4}, {"subspace": "class"}, {"dim": 4, "ensemble": True}])
def test_bfloat16_models_fit_and_score_in_float32(options):
    model, inputs, labels = _model_and_data(30)
    detector = LowDimGrad(model.bfloat16(), **options).fit(_batches(inputs.bfloat16(), labels))
    scores = detector.score(inputs[:5].bfloat16())
    assert scores.dtype == torch.float32 and bool(torch.isfinite(scores).all())
    assert detector.bank.dtype == torch.float32
    assert all(block.dtype == torch.float32 for block in detector.subspace.scaled_directions.values())


def test_a_model_without_a_linear_head_works_unless_the_ensemble_needs_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    inputs = torch.randn(20, 1, 6, 6, dtype=torch.float64)
    labels = torch.arange(20) % 3
    assert torch.isfinite(LowDimGrad(model, dim=3).fit(inputs).score(inputs[:4])).all()
    assert torch.isfinite(LowDimGrad(model, subspace="class").fit((inputs, labels)).score(inputs[:4])).all()
    with pytest.raises(ValueError, match="found no nn.Linear"):
        LowDimGrad(model, dim=3, ensemble=True).fit(inputs)


def test_fewer_fit_samples_than_neighbours_is_an_error_at_fit():
    from gradood.detectors import LowDimGrad

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).eval()
    detector = LowDimGrad(model, dim=2, neighbours=5)
    with pytest.raises(ValueError, match="neighbours=5 needs at least that many fit samples, got 4"):
        detector.fit(torch.randn(4, 4))
    with pytest.raises(RuntimeError, match="call fit"):
        detector.score(torch.randn(2, 4))
