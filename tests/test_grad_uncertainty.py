"""GradUncertainty (gradood.detectors.GradUncertainty) against literal per-sample autograd of
the confounding-label loss Σ_c −log softmax(f)_c in float64: the head's closed form across
logit gaps up to 100, the whole network, two averaged heads (distilled DeiT), the per-layer
norms; and the clamped binary_cross_entropy route that pytorch-ood differentiates, shown off."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from gradood.detectors import FullGradNorm, GradUncertainty
from gradood.detectors.grad_uncertainty import head_grad_uncertainty, output_term


class _Net(nn.Module):
    def __init__(self, width=16, classes=6, bias=True):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, width), nn.Tanh())
        self.fc = nn.Linear(width, classes, bias=bias)

    def forward(self, x):
        return self.fc(self.body(x))


def _literal(model: nn.Module, inputs: torch.Tensor, names=None) -> torch.Tensor:
    """−Σ ‖∇_θ L‖² per sample by autograd on each sample alone, float64."""
    copied = copy.deepcopy(model).double()
    scores = []
    for i in range(inputs.shape[0]):
        copied.zero_grad()
        logits = copied(inputs[i : i + 1].double())
        (-F.log_softmax(logits, 1).sum()).backward()
        total = sum(p.grad.square().sum() for n, p in copied.named_parameters() if names is None or n in names)
        scores.append(-total)
    return torch.stack(scores)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gap_scale", [0.1, 1.0, 30.0, 300.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_the_head_closed_form_is_autograd_at_every_logit_gap(gap_scale, bias, dtype):
    torch.manual_seed(0)
    model = _Net(bias=bias).eval()
    with torch.no_grad():
        model.fc.weight.mul_(gap_scale)
    model = model.to(dtype)
    inputs = torch.randn(9, 5, dtype=dtype)
    logits = model(inputs)
    gaps = logits.max(1).values - logits.min(1).values
    if gap_scale == 300.0:
        assert float(gaps.detach().max()) > 100  # confident rows: p of the others below e^-100
    names = {"fc.weight", "fc.bias"}
    expected = _literal(model, inputs, names)
    got = GradUncertainty(model, layers="head").score(inputs)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)
    assert got.dtype == dtype


def test_the_output_term_keeps_its_exact_value_where_the_softmax_saturates():
    classes = 10
    for gap in (0.0, 17.0, 28.0, 50.0, 100.0, 1000.0):
        logits = torch.zeros(1, classes, dtype=torch.float32)
        logits[0, 3] = gap
        p = torch.softmax(logits.double(), 1)
        exact = ((classes * p - 1) ** 2).sum()
        torch.testing.assert_close(output_term(logits)[0], exact, rtol=1e-14, atol=0)
    assert output_term(torch.zeros(2, classes)).abs().max() == 0  # uniform: no gradient


def test_pytorch_oods_clamped_bce_route_is_off_at_large_gaps():
    """binary_cross_entropy(softmax(f), 1)'s backward divides by max(p(1 − p), 1e-12): for a class
    with p below 1e-12 the gradient is too small by p(1 − p) / 1e-12, so the squared norm of a
    confident row is off by tens of percent (why the closed form is used)."""
    worst = 0.0
    for gap in (20.0, 28.0, 29.0, 35.0, 60.0, 100.0):
        logits = torch.zeros(1, 10, dtype=torch.float64)
        logits[0, 0] = gap
        logits.requires_grad_(True)
        F.binary_cross_entropy(logits.softmax(1), torch.ones_like(logits), reduction="sum").backward()
        theirs = logits.grad.square().sum()
        ours = output_term(logits.detach())[0]
        worst = max(worst, float(abs(theirs - ours) / ours))
    assert worst > 0.5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_the_network_score_is_autograd_over_every_parameter(dtype):
    torch.manual_seed(1)
    model = _Net().to(dtype).eval()
    inputs = torch.randn(7, 5, dtype=dtype)
    expected = _literal(model, inputs)
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(GradUncertainty(model).score(inputs).double(), expected, rtol=tolerance, atol=tolerance)
    # a subset of the parameters, and the identity with FullGradNorm (C times its gradient)
    subset = GradUncertainty(model, params=["body.0.weight"]).score(inputs)
    torch.testing.assert_close(subset.double(), _literal(model, inputs, {"body.0.weight"}), rtol=tolerance, atol=tolerance)
    gradnorm = FullGradNorm(model).score(inputs).double()
    torch.testing.assert_close(GradUncertainty(model).score(inputs).double(), -(6 * gradnorm) ** 2,
                               rtol=tolerance, atol=tolerance)


def test_layer_norms_are_the_per_layer_squares_that_sum_to_the_score():
    torch.manual_seed(2)
    model = _Net().double().eval()
    inputs = torch.randn(5, 5, dtype=torch.float64)
    detector = GradUncertainty(model)
    per_layer, names = detector.layer_norms(inputs)
    assert names == ("body.0", "fc") and per_layer.shape == (5, 2)
    torch.testing.assert_close(-per_layer.sum(1), detector.score(inputs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_layer[:, 1], -_literal(model, inputs, {"fc.weight", "fc.bias"}), rtol=1e-12, atol=1e-12)
    head = GradUncertainty(model, layers="head")
    column, head_names = head.layer_norms(inputs)
    assert head_names == ("fc",)
    torch.testing.assert_close(column[:, 0], per_layer[:, 1], rtol=1e-12, atol=1e-12)


def test_two_averaged_heads_count_each_bias_once():
    """A distilled DeiT (Hugging Face): f = (head(v₁) + distillation_head(v₂)) / 2; each head's
    weight and bias get half the gradient (β = 2/4)."""
    model = zoo.hf_deit_distilled(num_labels=4).double().eval()
    pixels = zoo.image_batch(3, generator_seed=1)["pixel_values"].double()
    detector = GradUncertainty(model, layers="head")
    got = detector.score({"pixel_values": pixels})
    assert detector._head.kind == "mean"
    heads = [model.get_submodule(name) for name in detector._head.names]
    expected = []
    for i in range(3):
        model.zero_grad()
        logits = model(pixel_values=pixels[i : i + 1]).logits
        (-F.log_softmax(logits, 1).sum()).backward()
        expected.append(-sum(p.grad.square().sum() for head in heads for p in head.parameters()))
    model.zero_grad()
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-9, atol=1e-12)


def test_errors_and_state():
    model = _Net()
    with pytest.raises(ValueError, match="layers must be one of"):
        GradUncertainty(model, layers="last")
    with pytest.raises(ValueError, match="layers='head' takes the head's weight and bias only"):
        GradUncertainty(model, layers="head", params=["fc.weight"])
    with pytest.raises(NotImplementedError, match="needs the inputs"):
        GradUncertainty(model).score_features(torch.randn(2, 6), torch.randn(2, 16))
    with pytest.raises(ValueError, match="features must have the batch size of logits"):
        head_grad_uncertainty(torch.randn(2, 6), torch.randn(3, 16))
    inputs = torch.randn(4, 5)
    head = GradUncertainty(model, layers="head")
    head.calibrate(head.score(inputs))
    loaded = GradUncertainty(model, layers="head").load_state_dict(head.state_dict())
    torch.testing.assert_close(loaded.score(inputs), head.score(inputs))
    with pytest.raises(ValueError, match="the state was saved with layers="):
        GradUncertainty(model).load_state_dict(head.state_dict())
    nan_inputs = inputs.clone()
    nan_inputs[1, 0] = math.nan
    scores = head.score(nan_inputs)
    assert scores[1].isnan() and torch.isfinite(scores[[0, 2, 3]]).all()
