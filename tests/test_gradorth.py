"""GradOrth (gradood.detectors.GradOrth) against a literal float64 procedure: the per-sample
autograd gradient of GradNorm's KL-to-uniform loss with respect to the head's weight, its input
side projected on the top singular vectors of the ID representation matrix (numpy's SVD, the rank
by the energy threshold), the Frobenius norm; and its degenerate fits."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from gradood.detectors import GradOrth


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5)).to(dtype).eval()
    fit = torch.randn(300, 6, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return model, fit


def _literal(model, fit_inputs, inputs, threshold=None, dim=None, temperature=1.0):
    with torch.no_grad():
        representation = model[:2](fit_inputs).numpy()
    _, singular, vt = np.linalg.svd(representation, full_matrices=False)
    if dim is None:
        held = np.cumsum(singular**2) / np.sum(singular**2)
        dim = int(np.argmax(held >= threshold)) + 1
    projector = vt[:dim].T @ vt[:dim]
    head = model[2]
    out = []
    for x in inputs:
        features = model[:2](x[None])
        log_p = F.log_softmax(head(features) / temperature, dim=1)
        loss = -(log_p.mean() + math.log(log_p.shape[1]))  # KL(u ‖ p)
        (gradient,) = torch.autograd.grad(loss, head.weight)
        out.append(np.linalg.norm(gradient.numpy() @ projector) * temperature)
    return np.array(out), dim


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("threshold,dim,temperature", [(0.97, None, 1.0), (0.5, None, 2.0), (None, 3, 1.0)])
def test_gradorth_is_the_projected_gradient_norm(dtype, threshold, dim, temperature):
    model, fit = _model(dtype)
    inputs = torch.randn(17, 6, generator=torch.Generator().manual_seed(2), dtype=dtype)
    kwargs = {"dim": dim} if dim is not None else {"threshold": threshold}
    detector = GradOrth(model, temperature=temperature, **kwargs).fit([fit[:100], fit[100:]])
    expected, k = _literal(copy.deepcopy(model).double(), fit.double(), inputs.double(), threshold, dim, temperature)
    assert detector.basis.shape == (16, k)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    np.testing.assert_allclose(detector.score(inputs).double().numpy(), expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(torch.cat([detector.score(inputs[:4]), detector.score(inputs[4:])]),
                               detector.score(inputs), rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
    fresh = GradOrth(model, temperature=temperature, **kwargs).load_state_dict(detector.state_dict())
    torch.testing.assert_close(fresh.score(inputs), detector.score(inputs))


def test_gradorth_degenerate_fits_and_rows():
    model, fit = _model()
    with torch.no_grad():  # features in a 2-dimensional subspace: rank 2 whatever the threshold
        model[0].weight[2:] = 0
        model[0].bias[2:] = -1.0
    rank_two = GradOrth(model, threshold=1.0).fit(fit)
    assert rank_two.basis.shape[1] <= 2
    tied = nn.Sequential(nn.Identity(), nn.Identity(), nn.Linear(2, 3)).double().eval()
    with pytest.raises(ValueError, match="the 1-th and 2-th singular values of the ID features are equal"):
        GradOrth(tied, threshold=0.5).fit(torch.eye(2, dtype=torch.float64).repeat(5, 1))
    with pytest.raises(ValueError, match="every ID feature is 0"):
        GradOrth(tied).fit(torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="the ID features hold NaN or Inf"):
        GradOrth(tied).fit(torch.full((4, 2), math.inf, dtype=torch.float64))
    with pytest.raises(ValueError, match="threshold must be in"):
        GradOrth(model, threshold=0.0)
    detector = GradOrth(model).fit(fit)
    logits, features = detector.forward_features(fit[:5])
    logits[1, 0], features[3, 2] = math.nan, math.nan
    scores = detector.score_features(logits, features)
    assert scores[[1, 3]].isnan().all() and torch.isfinite(scores[[0, 2, 4]]).all()
    with pytest.raises(RuntimeError, match="call fit"):
        GradOrth(model).score(fit)


def test_gradorth_on_a_timm_model():
    timm = zoo.timm_module()
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    fit = [zoo.image_batch(8, generator_seed=seed)["pixel_values"] for seed in range(3)]
    detector = GradOrth(model).fit(fit)
    inputs = zoo.image_batch(4, generator_seed=7)["pixel_values"]
    logits, features = detector.forward_features(inputs)
    p = torch.softmax(logits.double(), 1)
    expected = (p - 1 / 3).norm(dim=1) * (features.double() @ detector.basis).norm(dim=1)
    torch.testing.assert_close(detector.score(inputs).double(), expected, rtol=1e-5, atol=1e-7)
