"""NNGuide and GrOOD (gradood.detectors.NNGuide, .GrOOD) against literal float64
re-implementations of OpenOOD's postprocessors (NNGuide: its numpy normaliser, logsumexp and exact
inner-product top-k; GrOOD: class-mean prototypes and autograd of the nearest-prototype
cross-entropy with respect to the OOD prototype, one sample at a time, then brute-force nearest
gradients), and their degenerate cases."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from gradood.detectors import GrOOD, NNGuide
from gradood.detectors.grood import prototype_gradients


class _Net(nn.Module):
    def __init__(self, width=12, classes=4):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, width), nn.ReLU())
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.body(x))


def _fitted_model(dtype=torch.float64):
    """A net trained briefly so that it predicts every class and gets most of the fit data right."""
    torch.manual_seed(0)
    model = _Net().to(dtype)
    inputs = torch.randn(200, 6, generator=torch.Generator().manual_seed(1), dtype=dtype)
    labels = (inputs[:, 0] > 0).long() + 2 * (inputs[:, 1] > 0).long()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(60):
        optimiser.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        optimiser.step()
    return model.eval(), inputs, labels


def _features(model, inputs):
    with torch.no_grad():
        return model(inputs).double().numpy(), model.body(inputs).double().numpy()


def logsumexp(x, axis):
    return torch.logsumexp(torch.from_numpy(x), dim=axis).numpy()


def _nnguide_literal(model, fit_inputs, inputs, k):
    normalizer = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10  # noqa: E731 (OpenOOD's)
    logits, feats = _features(model, fit_inputs)
    bank = normalizer(feats) * logsumexp(logits, axis=-1)[:, None]
    test_logits, test_feats = _features(model, inputs)
    similarities = normalizer(test_feats) @ bank.T
    conf = np.sort(similarities, axis=1)[:, ::-1][:, :k].mean(1)
    return conf * logsumexp(test_logits, axis=-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("k", [1, 7])
def test_nnguide_is_openoods_procedure(dtype, k):
    model, fit_inputs, _ = _fitted_model(dtype)
    inputs = torch.randn(23, 6, generator=torch.Generator().manual_seed(7), dtype=dtype)
    detector = NNGuide(model, neighbours=k).fit([fit_inputs[:90], fit_inputs[90:]])
    expected = _nnguide_literal(copy.deepcopy(model).double(), fit_inputs.double(), inputs.double(), k)
    tolerance = 1e-8 if dtype == torch.float64 else 2e-5  # OpenOOD adds 1e-10 to every normalised entry
    np.testing.assert_allclose(detector.score(inputs).double().numpy(), expected, rtol=tolerance, atol=tolerance)
    whole = detector.score(inputs)
    torch.testing.assert_close(torch.cat([detector.score(inputs[:5]), detector.score(inputs[5:])]), whole,
                               rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


def test_nnguide_degenerate_cases():
    model, fit_inputs, _ = _fitted_model()
    detector = NNGuide(model, neighbours=5, max_samples=50).fit([fit_inputs[:30], fit_inputs[30:]])
    assert detector.bank.shape == (50, 12)
    logits, features = detector.forward_features(fit_inputs[:6])
    broken = features.clone()
    broken[2, 3] = math.nan
    broken[4, 0] = math.inf
    scores = detector.score_features(logits, broken)
    assert scores[[2, 4]].isnan().all() and torch.isfinite(scores[[0, 1, 3, 5]]).all()
    zero = detector.score_features(logits, torch.zeros_like(features))  # no direction: no guidance
    assert (zero == 0).all()
    with pytest.raises(ValueError, match="neighbours=5 needs at least that many fit samples, got 3"):
        NNGuide(model, neighbours=5).fit(fit_inputs[:3])
    with pytest.raises(ValueError, match="the ID features or logits hold NaN or Inf"):
        NNGuide(model, neighbours=1).fit(fit_inputs[:3] * math.inf)
    with pytest.raises(ValueError, match="neighbours must be an integer"):
        NNGuide(model, neighbours=0)
    fresh = NNGuide(model, neighbours=5, max_samples=50).load_state_dict(detector.state_dict())
    torch.testing.assert_close(fresh.score(fit_inputs), detector.score(fit_inputs))


def _grood_literal(model, fit_inputs, fit_labels, inputs, k=1, ood_inputs=None):
    """OpenOOD's GrOOD postprocessor in float64: prototypes by label, the OOD prototype as the mean
    of the class prototypes (or of ood_inputs' features), autograd of the cross-entropy of
    −‖v − prototype‖ at the predicted class with respect to the OOD prototype per sample, the bank
    of correctly classified fit samples, minus the k-th smallest squared distance."""
    logits, feats = (torch.from_numpy(a) for a in _features(model, fit_inputs))
    classes = logits.shape[1]
    prototypes = torch.stack([feats[fit_labels == c].mean(0) for c in range(classes)])
    if ood_inputs is None:
        noise = prototypes.mean(0)
    else:
        noise = torch.from_numpy(_features(model, ood_inputs)[1]).mean(0)

    def gradients(logits, feats):
        out = []
        for i in range(feats.shape[0]):
            mu_o = noise.clone().requires_grad_()
            everything = torch.cat([prototypes, mu_o[None]])
            ncc = -torch.norm(feats[i][None] - everything, dim=1)
            loss = F.cross_entropy(ncc[None], logits[i].argmax()[None])
            out.append(torch.autograd.grad(loss, mu_o)[0])
        return torch.stack(out)

    correct = logits.argmax(1) == fit_labels
    bank = gradients(logits[correct], feats[correct]).numpy()
    test_logits, test_feats = (torch.from_numpy(a) for a in _features(model, inputs))
    queries = gradients(test_logits, test_feats).numpy()
    distances = ((queries[:, None, :] - bank[None, :, :]) ** 2).sum(2)
    return -np.sort(distances, axis=1)[:, k - 1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("k,use_ood", [(1, False), (4, True)])
def test_grood_is_openoods_procedure(dtype, k, use_ood):
    model, fit_inputs, fit_labels = _fitted_model(dtype)
    inputs = torch.randn(23, 6, generator=torch.Generator().manual_seed(7), dtype=dtype)
    ood_inputs = 3 * torch.randn(40, 6, generator=torch.Generator().manual_seed(8), dtype=dtype) + 2
    detector = GrOOD(model, neighbours=k).fit(
        [(fit_inputs[:90], fit_labels[:90]), (fit_inputs[90:], fit_labels[90:])],
        ood_data=[ood_inputs[:15], ood_inputs[15:]] if use_ood else None,
    )
    expected = _grood_literal(copy.deepcopy(model).double(), fit_inputs.double(), fit_labels, inputs.double(), k,
                              ood_inputs.double() if use_ood else None)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(detector.score(inputs).double().numpy(), expected, rtol=tolerance, atol=tolerance)
    whole = detector.score(inputs)
    torch.testing.assert_close(torch.cat([detector.score(inputs[:5]), detector.score(inputs[5:])]), whole,
                               rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-7)
    fresh = GrOOD(model, neighbours=k).load_state_dict(detector.state_dict())
    torch.testing.assert_close(fresh.score(inputs), whole)


def test_grood_gradients_where_prototypes_nearly_coincide_and_at_the_ood_prototype():
    """The GEMM form of ‖v − μ_c‖² cancels for a feature next to a prototype far from the origin;
    at v = μ_o the gradient is 0 (autograd's subgradient of the norm)."""
    generator = torch.Generator().manual_seed(3)
    prototypes = 1e4 + torch.randn(5, 16, generator=generator, dtype=torch.float64)
    ood = prototypes.mean(0) + torch.randn(16, generator=generator, dtype=torch.float64)
    features = torch.cat([prototypes[:3] + 1e-6 * torch.randn(3, 16, generator=generator, dtype=torch.float64),
                          ood[None]])
    got = prototype_gradients(features, prototypes, ood)
    distances = torch.cdist(features, torch.cat([prototypes, ood[None]]))  # from the differences
    p_ood = torch.softmax(-distances, 1)[:, -1]
    towards = features - ood
    expected = p_ood[:, None] * towards / distances[:, -1:]
    expected[3] = 0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-300)
    assert (got[3] == 0).all()


def test_grood_degenerate_cases():
    model, fit_inputs, fit_labels = _fitted_model()
    with pytest.raises(ValueError, match=r"class\(es\) 3 \(1 of 4\) have no fit sample"):
        GrOOD(model).fit([(fit_inputs[fit_labels != 3], fit_labels[fit_labels != 3])])
    with pytest.raises(ValueError, match="the fit data give no labels"):
        GrOOD(model).fit(fit_inputs)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        GrOOD(model).fit([(fit_inputs, fit_labels - 1)])
    with pytest.raises(ValueError, match="neighbours=500 needs at least that many correctly classified"):
        GrOOD(model, neighbours=500).fit([(fit_inputs, fit_labels)])
    keep = (fit_labels != 3) | (torch.arange(len(fit_labels)) == int((fit_labels == 3).nonzero()[0]))
    detector = GrOOD(model).fit([(fit_inputs[keep], fit_labels[keep])])  # class 3 has one sample
    torch.testing.assert_close(detector.prototypes[3], model.body(fit_inputs[keep][fit_labels[keep] == 3])[0].detach())
    predicted = GrOOD(model, classes="predicted", max_samples=64).fit(fit_inputs)
    assert predicted.bank.shape == (64, 12)
    logits, features = detector.forward_features(fit_inputs[:6])
    broken = features.clone()
    broken[1, 2] = math.nan
    scores = detector.score_features(logits, broken)
    assert scores[1].isnan() and torch.isfinite(scores[[0, 2, 3, 4, 5]]).all()
    with pytest.raises(RuntimeError, match="call fit"):
        GrOOD(model).score(fit_inputs)


def test_on_hugging_face_and_timm_models():
    model = zoo.hf_convnext(num_labels=3)  # its random weights predict every class
    fit = [zoo.image_batch(16, generator_seed=seed) for seed in range(4)]
    inputs = zoo.image_batch(4, generator_seed=9)
    grood = GrOOD(model, classes="predicted").fit(fit, ood_data=[zoo.image_batch(8, generator_seed=11)])
    nnguide = NNGuide(model, neighbours=5).fit(fit)
    for detector in (grood, nnguide):
        scores = detector.score(inputs)
        assert scores.shape == (4,) and bool(torch.isfinite(scores).all())
    logits, features = grood.forward_features(inputs)
    g = prototype_gradients(features, grood.prototypes, grood.ood_prototype)
    expected = -((g[:, None, :].double() - grood.bank[None].double()) ** 2).sum(2).min(1).values
    torch.testing.assert_close(grood.score(inputs).double(), expected, rtol=1e-5, atol=1e-9)
