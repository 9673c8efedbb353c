"""Bad input gets an error naming the argument and what was expected, in
gradood.scores and gradood.reference alike."""

from __future__ import annotations

import math

import pytest
import torch

import gradood
from gradood import reference, scores

MODULES = [scores, reference]
WITH_FEATURES = ["gradnorm", "exgrad", "grodin_last_layer", "rg", "rg_additive", "uv"]
LOGITS_ONLY = ["msp", "max_logit", "energy"]
WITH_TEMPERATURE = ["msp", "energy", "gradnorm", "exgrad", "grodin_last_layer", "rg", "uv"]


def _call(module, name, logits, features=None, **kwargs):
    function = getattr(module, name)
    if name in LOGITS_ONLY:
        return function(logits, **kwargs)
    return function(logits, features, **kwargs)


@pytest.fixture(params=MODULES, ids=lambda module: module.__name__)
def module(request):
    return request.param


@pytest.mark.parametrize("name", LOGITS_ONLY + WITH_FEATURES)
def test_empty_batch(module, name):
    with pytest.raises(ValueError, match=r"logits is an empty batch \(shape \(0, 4\)\)"):
        _call(module, name, torch.empty(0, 4), torch.empty(0, 3))


@pytest.mark.parametrize("name", LOGITS_ONLY + WITH_FEATURES)
def test_logits_must_be_2d(module, name):
    with pytest.raises(ValueError, match=r"logits must be a 2-D tensor \[B, C\], got shape \(4,\)"):
        _call(module, name, torch.randn(4), torch.rand(4, 3))


@pytest.mark.parametrize("name", LOGITS_ONLY + WITH_FEATURES)
def test_logits_must_be_floating_point(module, name):
    with pytest.raises(TypeError, match="logits must be a floating-point tensor, got dtype torch.int64"):
        _call(module, name, torch.ones(2, 3, dtype=torch.int64), torch.rand(2, 3))


@pytest.mark.parametrize("name", LOGITS_ONLY + WITH_FEATURES)
def test_logits_must_be_a_tensor(module, name):
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        _call(module, name, [[1.0, 2.0]], torch.rand(1, 3))


@pytest.mark.parametrize("name", WITH_FEATURES)
def test_batch_size_mismatch(module, name):
    with pytest.raises(ValueError, match=r"features must have the batch size of logits \(4\), got shape \(3, 5\)"):
        _call(module, name, torch.randn(4, 3), torch.rand(3, 5))


@pytest.mark.parametrize("name", WITH_FEATURES)
def test_features_must_be_2d(module, name):
    with pytest.raises(ValueError, match=r"features must be a 2-D tensor \[B, D\], got shape \(4, 2, 2\)"):
        _call(module, name, torch.randn(4, 3), torch.rand(4, 2, 2))


@pytest.mark.parametrize("name", WITH_FEATURES)
def test_dtype_mismatch(module, name):
    with pytest.raises(TypeError, match="features must have the dtype of logits \\(torch.float32\\), got torch.float64"):
        _call(module, name, torch.randn(2, 3), torch.rand(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("name", WITH_FEATURES)
def test_device_mismatch(module, name):
    with pytest.raises(ValueError, match="features must be on the device of logits \\(cpu\\), got meta"):
        _call(module, name, torch.randn(2, 3), torch.empty(2, 4, device="meta"))


@pytest.mark.parametrize("name", WITH_TEMPERATURE)
@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf])
def test_temperature_must_be_positive_and_finite(module, name, temperature):
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        _call(module, name, torch.randn(2, 3), torch.rand(2, 4), temperature=temperature)


@pytest.mark.parametrize("name", ["rg", "rg_additive"])
@pytest.mark.parametrize("clip", [0.0, -0.5, math.nan])
def test_clip_must_be_positive(module, name, clip):
    with pytest.raises(ValueError, match="clip must be > 0"):
        _call(module, name, torch.randn(2, 3), torch.rand(2, 4), clip=clip)


def test_uv_needs_clip_for_clipped_l1(module):
    with pytest.raises(ValueError, match="clip is required for v='clipped_l1'"):
        module.uv(torch.randn(2, 3), torch.rand(2, 4), u="energy", v="clipped_l1")


@pytest.mark.parametrize("kwargs,message", [
    ({"u": "softmax"}, "u must be one of"),
    ({"v": "l3"}, "v must be one of"),
])
def test_uv_rejects_unknown_terms(module, kwargs, message):
    with pytest.raises(ValueError, match=message):
        module.uv(torch.randn(2, 3), torch.rand(2, 4), **kwargs)


def test_gradnorm_rejects_unknown_scale(module):
    with pytest.raises(ValueError, match="scale must be one of 'paper', 'official', got 'huge'"):
        module.gradnorm(torch.randn(2, 3), torch.rand(2, 4), scale="huge")


def test_rg_additive_rejects_non_finite_alpha(module):
    with pytest.raises(ValueError, match="alpha must be a finite real number"):
        module.rg_additive(torch.randn(2, 3), torch.rand(2, 4), alpha=math.inf)


@pytest.mark.parametrize("loss,p,message", [
    ("hinge", 1.0, "loss must be one of"),
    ("ce_pred", 0.5, "p must be >= 1|has no kernel"),
    ("ce_pred", -1.0, "p must be finite and > 0"),
])
def test_lastlayer_grad_norm_rejects_bad_loss_or_p(module, loss, p, message):
    with pytest.raises(ValueError, match=message):
        module.lastlayer_grad_norm(torch.randn(2, 3), torch.rand(2, 4), loss, p)


def test_react_rejects_mismatched_weight(module):
    features = torch.rand(2, 4)
    with pytest.raises(ValueError, match=r"weight must be \[C, 4\] to match features"):
        module.react(features, torch.randn(3, 5), None, 1.0)
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \[3\] or None"):
        module.react(features, torch.randn(3, 4), torch.randn(4), 1.0)
    with pytest.raises(TypeError, match="weight must have the dtype of features"):
        module.react(features, torch.randn(3, 4, dtype=torch.float64), None, 1.0)


def test_kl_matching_rejects_mismatched_templates(module):
    with pytest.raises(ValueError, match=r"templates must be \[K, 3\]"):
        module.kl_matching(torch.randn(2, 3), torch.rand(3, 4))
    with pytest.raises(ValueError, match="mode='predicted' needs one template per class"):
        module.kl_matching(torch.randn(2, 3), torch.rand(2, 3), mode="predicted")


@pytest.mark.parametrize("name", LOGITS_ONLY + WITH_FEATURES)
def test_scores_reject_dtypes_without_a_kernel(name):
    logits = torch.randn(2, 3).to(torch.float8_e4m3fn) if hasattr(torch, "float8_e4m3fn") else None
    if logits is None:
        pytest.skip("this torch has no float8 dtype")
    with pytest.raises(TypeError, match="logits must be one of float16, bfloat16, float32, float64"):
        _call(scores, name, logits, torch.rand(2, 4).to(logits.dtype))


def test_backward_through_a_norm_operator_raises_instead_of_a_silent_zero():
    """The per-sample norm operators have no derivative (the scores have one:
    tests/test_score_gradients.py): their outputs carry a grad_fn that raises, so no
    gradient silently goes missing; under no_grad nothing is tracked."""
    activations = torch.randn(2, 3, 4, requires_grad=True)
    grads = torch.randn(2, 3, 5)
    norms = torch.ops.gradood.outer_product_sq_norm(activations, grads, "ghost")
    with pytest.raises(RuntimeError, match="derivative for gradood::outer_product_sq_norm is not implemented"):
        norms.sum().backward()
    with torch.no_grad():
        assert not scores.gradnorm(torch.randn(4, 10, requires_grad=True), torch.rand(4, 16)).requires_grad




def test_a_dataloader_given_to_score_is_a_clear_type_error():
    from torch.utils.data import DataLoader, TensorDataset

    from gradood.detectors import LowDimGrad

    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).eval()
    detector = LowDimGrad(model, dim=2).fit(torch.randn(16, 4))
    with pytest.raises(TypeError, match="inputs must be a tensor or a mapping.*got DataLoader"):
        detector.score(DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=2))


@pytest.mark.parametrize("build,message", [
    (lambda m: gradood.detectors.MSP(m, temperature=0), "MSP: temperature"),
    (lambda m: gradood.detectors.Energy(m, temperature=-1.0), "Energy: temperature"),
    (lambda m: gradood.detectors.ExGrad(m, temperature=float("nan")), "ExGrad: temperature"),
    (lambda m: gradood.detectors.GradNorm(m, scale="x"), "GradNorm: scale"),
    (lambda m: gradood.detectors.UV(m, u="nope"), "UV: u"),
    (lambda m: gradood.detectors.UV(m, v="clipped_l1"), "UV: .*clip"),
    (lambda m: gradood.detectors.KLMatching(m, mode="max"), "KLMatching: mode"),
])
def test_invalid_constructor_arguments_fail_at_construction(build, message):
    with pytest.raises(ValueError, match=message):
        build(torch.nn.Linear(3, 2))
