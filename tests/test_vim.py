"""ViM (gradood.detectors.ViM) against a literal numpy re-implementation of the official
procedure (o = −pinv(W) b, the uncentred covariance about o, numpy's eigh, the eigenvectors
beyond the top dim, α from the fit data, energy minus α · residual), and its refusals."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import zoo
from helpers import pytorch_ood_detectors
from gradood import OODHead
from gradood.detectors import ViM
from gradood.detectors.vim import default_dim


class _Net(nn.Module):
    def __init__(self, width=12, classes=5, bias=True):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, width), nn.Tanh())
        self.fc = nn.Linear(width, classes, bias=bias)

    def forward(self, x):
        return self.fc(self.body(x))


def _literal(model: _Net, fit_inputs, inputs, dim):
    """The official code's steps (numpy, float64; sklearn's EmpiricalCovariance with
    assume_centered=True is XᵀX / N)."""
    with torch.no_grad():
        train, test = model.body(fit_inputs).double().numpy(), model.body(inputs).double().numpy()
    w = model.fc.weight.detach().double().numpy()
    b = model.fc.bias.detach().double().numpy() if model.fc.bias is not None else np.zeros(w.shape[0])
    u = -np.matmul(np.linalg.pinv(w), b)
    covariance = (train - u).T @ (train - u) / train.shape[0]
    eig_vals, eigen_vectors = np.linalg.eigh(covariance)
    ns = np.ascontiguousarray(eigen_vectors[:, np.argsort(eig_vals * -1)[dim:]])
    vlogit_train = np.linalg.norm(np.matmul(train - u, ns), axis=-1)
    alpha = (train @ w.T + b).max(axis=-1).mean() / vlogit_train.mean()
    logits = test @ w.T + b
    top = logits.max(1, keepdims=True)
    energy = (top + np.log(np.exp(logits - top).sum(1, keepdims=True))).squeeze(1)
    return energy - alpha * np.linalg.norm(np.matmul(test - u, ns), axis=-1)


def _positive_net(bias=True, seed=0):
    """A head whose ID max logits are positive on average (α > 0)."""
    torch.manual_seed(seed)
    model = _Net(bias=bias).double().eval()
    with torch.no_grad():
        if bias:
            model.fc.bias.add_(1.0)
        else:
            model.fc.weight.mul_(3.0)
    return model


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dim", [1, 5, 11])
def test_vim_is_the_official_procedure(dim, bias):
    model = _positive_net(bias)
    generator = torch.Generator().manual_seed(1)
    fit_inputs = torch.randn(90, 6, generator=generator, dtype=torch.float64)
    inputs = torch.cat([torch.randn(7, 6, generator=generator, dtype=torch.float64), 4 * torch.randn(3, 6, generator=generator, dtype=torch.float64)])
    batches = [(fit_inputs[i : i + 32], None) for i in range(0, 90, 32)]  # streamed in uneven batches
    detector = ViM(model, dim=dim).fit(batches)
    expected = _literal(model, fit_inputs, inputs, dim)
    np.testing.assert_allclose(detector.score(inputs).numpy(), expected, rtol=1e-10, atol=1e-10)
    one_by_one = torch.cat([detector.score(inputs[i : i + 1]) for i in range(inputs.shape[0])])
    torch.testing.assert_close(one_by_one, detector.score(inputs), rtol=1e-12, atol=1e-12)
    single = ViM(model.float(), dim=dim).fit(fit_inputs.float())  # float32 model: float64 statistics
    np.testing.assert_allclose(single.score(inputs.float()).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_the_default_dim_is_the_official_rule_and_the_state_round_trips():
    assert [default_dim(d) for d in (12, 767, 768, 2047, 2048, 4096)] == [6, 383, 512, 512, 1000, 1000]
    model = _positive_net()
    fit_inputs = torch.randn(60, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    detector = ViM(model).fit(fit_inputs)
    assert detector.null_space.shape == (12, 6)
    np.testing.assert_allclose(detector.score(fit_inputs[:4]).numpy(), _literal(model, fit_inputs, fit_inputs[:4], 6),
                               rtol=1e-10, atol=1e-10)
    buffer = io.BytesIO()
    torch.save(detector.state_dict(), buffer)
    buffer.seek(0)
    restored = ViM(model).load_state_dict(torch.load(buffer))
    assert torch.equal(restored.score(fit_inputs[:4]), detector.score(fit_inputs[:4]))
    with pytest.raises(ValueError, match="the state was saved with dim="):
        ViM(model, dim=3).load_state_dict(detector.state_dict())
    head = OODHead(model, detector, example_inputs=fit_inputs[:3])  # exported since ViM's residual is in OODHead
    torch.testing.assert_close(head(fit_inputs[:4])[1], detector.score(fit_inputs[:4]))


def test_a_residual_space_that_is_not_determined_is_refused():
    model = _positive_net()
    fit_inputs = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with pytest.raises(ValueError, match="6-th and 7-th eigenvalues .* are equal"):
        ViM(model, dim=6).fit(fit_inputs)  # 4 samples: eigenvalues 5 to 12 are all 0
    assert ViM(model, dim=3).fit(fit_inputs).alpha > 0  # the top 3 of 4 directions are determined
    with pytest.raises(ValueError, match="dim=12 leaves no residual space"):
        ViM(model, dim=12).fit(fit_inputs)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="dim must be a positive integer"):
            ViM(model, dim=bad)


def test_no_residual_a_negative_alpha_and_non_finite_data_are_refused():
    model = _positive_net()
    fit_inputs = torch.randn(30, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    negative = _positive_net()
    with torch.no_grad():
        negative.fc.bias.sub_(30.0)
    with pytest.raises(ValueError, match="mean ID max logit is .* <= 0"):
        ViM(negative, dim=3).fit(fit_inputs)
    broken = fit_inputs.clone()
    broken[3, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        ViM(model, dim=3).fit(broken)
    with pytest.raises(ValueError, match="holds no sample"):
        ViM(model, dim=3).fit([])
    with pytest.raises(RuntimeError, match="call fit"):
        ViM(model).score(fit_inputs[:2])
    flat = nn.Sequential(nn.Identity(), nn.Linear(6, 3, bias=False)).double().eval()  # o = 0
    with torch.no_grad():
        flat[1].weight.abs_()
    rank_two = torch.zeros(20, 6, dtype=torch.float64)  # the ID features span 2 of 6 dimensions
    rank_two[:, :2] = torch.rand(20, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 1
    with pytest.raises(ValueError, match="no residual outside the top 2"):
        ViM(flat, dim=2).fit(rank_two)


def test_nan_rows_stay_isolated():
    model = _positive_net()
    fit_inputs = torch.randn(40, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    detector = ViM(model, dim=4).fit(fit_inputs)
    queries = fit_inputs[:3].clone()
    queries[1, 2] = math.nan
    scores = detector.score(queries)
    assert math.isnan(scores[1]) and bool(torch.isfinite(scores[[0, 2]]).all())
    torch.testing.assert_close(scores[[0, 2]], detector.score(fit_inputs[[0, 2]]))


def _hf_vit():
    model = zoo.hf_vit(num_labels=3)
    with torch.no_grad():
        model.classifier.bias.fill_(2.0)  # positive ID max logits
    return model


def _timm_resnet():
    model = zoo.timm_module().create_model("resnet18", pretrained=False, num_classes=3).eval()
    with torch.no_grad():
        model.get_classifier().bias.fill_(2.0)
    return model


@pytest.mark.parametrize("make", [_hf_vit, _timm_resnet], ids=["transformers-vit", "timm-resnet18"])
def test_on_timm_and_hugging_face_models(make):
    model = make()
    tensors = make is _timm_resnet  # timm takes the image tensor, transformers pixel_values=
    batch = (lambda seed, n: zoo.image_batch(n, generator_seed=seed)["pixel_values"]) if tensors else (
        lambda seed, n: zoo.image_batch(n, generator_seed=seed))
    batches = [batch(seed, 16) for seed in range(3)]
    detector = ViM(model, dim=8).fit(batches)
    queries = batch(9, 4)
    scores = detector.score(queries)
    assert scores.shape == (4,) and bool(torch.isfinite(scores).all())
    logits, features = detector.forward_features(queries)
    residual = torch.linalg.vector_norm((features.double() - detector.origin) @ detector.null_space, dim=1)
    assert scores.dtype == torch.float32  # float32 models: the float32 residual GEMM
    torch.testing.assert_close(scores.double(), torch.logsumexp(logits.double(), 1) - detector.alpha * residual,
                               rtol=1e-5, atol=1e-5)


def test_matches_pytorch_ood():
    """pytorch-ood's ViM (numpy, sklearn's EmpiricalCovariance; OOD-high, logits clipped at ±100,
    which these logits never reach) on the same features."""
    pytest.importorskip("sklearn")
    detector_module = pytorch_ood_detectors()
    model = _positive_net(seed=3)
    generator = torch.Generator().manual_seed(7)
    fit_inputs, inputs = torch.randn(80, 6, generator=generator, dtype=torch.float64), torch.randn(9, 6, generator=generator, dtype=torch.float64)
    theirs = detector_module.ViM(model=model.body, d=4, w=model.fc.weight, b=model.fc.bias)
    with torch.no_grad():
        theirs.fit_features(model.body(fit_inputs), torch.zeros(80, dtype=torch.long))
        expected = -theirs.predict_features(model.body(inputs)).double()
    ours = ViM(model, dim=4).fit(fit_inputs)
    assert ours.alpha == pytest.approx(theirs.alpha, rel=1e-10)
    torch.testing.assert_close(ours.score(inputs), expected, rtol=1e-5, atol=1e-5)  # theirs returns float32


def test_the_float32_statistics_follow_refits_and_loads():
    """The float32 copies of o and R are cached: a refit, a loaded state or an in-place change
    of R must not score with the old ones."""
    model = _positive_net().float()
    generator = torch.Generator().manual_seed(8)
    first, second = torch.randn(40, 6, generator=generator), 3 * torch.randn(40, 6, generator=generator)
    queries = torch.randn(5, 6, generator=generator)
    detector = ViM(model, dim=3).fit(first)
    before = detector.score(queries)
    detector.fit(second)
    torch.testing.assert_close(detector.score(queries), ViM(model, dim=3).fit(second).score(queries), rtol=0, atol=0)
    detector.load_state_dict(ViM(model, dim=3).fit(first).state_dict())
    torch.testing.assert_close(detector.score(queries), before, rtol=0, atol=0)
    with torch.no_grad():
        detector.null_space.mul_(2.0)
    assert not torch.allclose(detector.score(queries), before)


def _official(train, test, w, b, dim):
    """The official steps on float64 arrays (features, head weight and bias)."""
    u = -np.linalg.pinv(w) @ b
    eig_vals, eigen_vectors = np.linalg.eigh((train - u).T @ (train - u) / train.shape[0])
    ns = eigen_vectors[:, np.argsort(-eig_vals)[dim:]]
    alpha = (train @ w.T + b).max(1).mean() / np.linalg.norm((train - u) @ ns, axis=1).mean()
    logits = test @ w.T + b
    top = logits.max(1, keepdims=True)
    energy = (top + np.log(np.exp(logits - top).sum(1, keepdims=True))).squeeze(1)
    return energy - alpha * np.linalg.norm((test - u) @ ns, axis=1)


def _head(weight, bias):
    fc = nn.Linear(weight.shape[1], weight.shape[0]).eval()
    with torch.no_grad():
        fc.weight.copy_(weight)
        fc.bias.copy_(bias)
    return nn.Sequential(nn.Identity(), fc)


@pytest.mark.parametrize("origin_norm", [1e2, 1e4, 1e5])
def test_a_far_origin_costs_no_float32_accuracy(origin_norm):
    """A head with a small singular value puts o far out (‖o‖ up to 8e4 with logits of ~9):
    subtracting o from float32 features lost ‖o‖·eps per element (1e-2 at 8e4, review)."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    weight = (u * torch.tensor([3.0, 2, 2, 1.5, 10 / origin_norm], dtype=torch.float64)) @ v[:, :5].T
    bias = -(weight @ (origin_norm * v[:, 4])) + 2.0
    fit, queries = torch.randn(300, 12, generator=g), torch.randn(6, 12, generator=g)
    model = _head(weight, bias).float()
    expected = _official(fit.double().numpy(), queries.double().numpy(), model[1].weight.double().detach().numpy(),
                         model[1].bias.double().detach().numpy(), 6)
    scores = ViM(model, dim=6).fit(fit).score(queries)
    float64_error = np.abs(ViM(model.double(), dim=6).fit(fit.double()).score(queries.double()).numpy() - expected).max()
    assert np.abs(scores.double().numpy() - expected).max() <= 4e-6 + 2 * float64_error  # the head's own conditioning


@pytest.mark.parametrize("scale", [1e-25, 1e19, 1e21])
def test_float32_features_at_extreme_scales(scale):
    """The float32 norm neither overflows (1e19 · 4 entries gave inf) nor underflows (1e-25)."""
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(4, 8, generator=g, dtype=torch.float64) / scale, torch.ones(4, dtype=torch.float64)
    fit, queries = scale * torch.randn(60, 8, generator=g), scale * torch.randn(5, 8, generator=g)
    model = _head(weight.float(), bias.float())
    expected = _official(fit.double().numpy(), queries.double().numpy(), model[1].weight.double().detach().numpy(),
                         model[1].bias.double().detach().numpy(), 3)
    np.testing.assert_allclose(ViM(model, dim=3).fit(fit).score(queries).double().numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_residual_of_round_off_is_refused(dtype):
    """One sample (or its duplicates) has rank 1 about o: at dim = 1 its residual is round-off,
    α came out ~1e15 and the fit sample itself scored −2e8 (review)."""
    g = torch.Generator().manual_seed(2)
    model = _head(torch.randn(5, 12, generator=g, dtype=torch.float64), torch.ones(5, dtype=torch.float64)).to(dtype)
    one = torch.randn(1, 12, generator=g, dtype=dtype)
    for fit in (one, one.repeat(50, 1)):
        with pytest.raises(ValueError, match="no residual outside the top 1 directions"):
            ViM(model, dim=1).fit(fit)
    bottleneck = torch.randn(100, 3, generator=g, dtype=dtype) @ torch.randn(3, 12, generator=g, dtype=dtype)
    with pytest.raises(ValueError, match="no residual|are equal"):  # rank 3 (4 about o): dim = 4 leaves round-off
        ViM(model, dim=4).fit(bottleneck)


def test_features_in_a_reused_buffer_are_copied_during_the_fit():
    """A model writing its features into one buffer it reuses between batches: the fit kept views,
    so every batch aliased the last one (α 3.158 against 2.870, review)."""

    class Buffered(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head, self.buffer = head, torch.zeros(32, 8)

        def forward(self, x):
            self.buffer[: x.shape[0]].copy_(x)
            return self.head(self.buffer[: x.shape[0]])

    g = torch.Generator().manual_seed(3)
    head = nn.Linear(8, 4).eval()
    with torch.no_grad():
        head.bias.fill_(2.0)
    fit = torch.randn(96, 8, generator=g)
    buffered = ViM(Buffered(head), dim=3).fit([fit[i : i + 32] for i in range(0, 96, 32)])
    plain = ViM(nn.Sequential(nn.Identity(), head), dim=3).fit(fit)
    assert buffered.alpha == pytest.approx(plain.alpha, rel=1e-12)
