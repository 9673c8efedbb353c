"""Closed forms of gradood.reference (and gradood.scores in float64) against
literal per-sample autograd, and against 60-digit arithmetic on confident rows."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from gradood import reference, scores
from gradood.testing import autograd_lastlayer_grad_norm
from helpers import logits_of, make_layer_and_features, mp_lastlayer_norm

CLASSES = (1, 2, 10, 1000)
FEATURES = (1, 7, 512)
TEMPERATURES = (0.5, 1.0, 1000.0)
GRID = list(itertools.product(CLASSES, FEATURES, TEMPERATURES))
RTOL = 1e-9


def _batch(num_classes: int) -> int:
    return 3 if num_classes == 1000 else 5


@functools.lru_cache(maxsize=None)
def _case(num_classes: int, num_features: int):
    layer, features = make_layer_and_features(num_classes, num_features, _batch(num_classes), seed=num_classes * 7919 + num_features)
    return layer, features, logits_of(layer, features)


@functools.lru_cache(maxsize=None)
def _oracle(num_classes, num_features, temperature, loss, p, include_bias):
    layer, features, _ = _case(num_classes, num_features)
    return autograd_lastlayer_grad_norm(layer, features, loss, p, temperature, include_bias)


def _assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=1e-300, check_dtype=False)


@pytest.mark.parametrize("num_classes,num_features,temperature", GRID)
@pytest.mark.parametrize("include_bias", [False, True])
def test_gradnorm_paper_scale_is_the_kl_uniform_gradient_l1_norm(num_classes, num_features, temperature, include_bias):
    _, features, logits = _case(num_classes, num_features)
    expected = _oracle(num_classes, num_features, temperature, "kl_uniform", 1.0, include_bias)
    _assert_close(reference.gradnorm(logits, features, temperature, include_bias=include_bias), expected)
    _assert_close(scores.gradnorm(logits, features, temperature, include_bias=include_bias), expected)


@pytest.mark.parametrize("num_classes,num_features,temperature", GRID)
def test_gradnorm_official_scale_is_the_all_ones_target_gradient(num_classes, num_features, temperature):
    _, features, logits = _case(num_classes, num_features)
    expected = _oracle(num_classes, num_features, temperature, "all_ones_ce", 1.0, False)
    _assert_close(reference.gradnorm(logits, features, temperature, scale="official"), expected)
    _assert_close(scores.gradnorm(logits, features, temperature, scale="official"), expected)


@pytest.mark.parametrize("num_classes,num_features,temperature", GRID)
def test_exgrad_is_the_negated_expected_ce_gradient_l1_norm(num_classes, num_features, temperature):
    _, features, logits = _case(num_classes, num_features)
    expected = _oracle(num_classes, num_features, temperature, "expected_ce", 1.0, False)
    _assert_close(reference.exgrad(logits, features, temperature), -expected)
    _assert_close(scores.exgrad(logits, features, temperature), -expected)


@pytest.mark.parametrize("num_classes,num_features,temperature", GRID)
@pytest.mark.parametrize("include_bias", [True, False])
def test_grodin_last_layer_is_the_negated_ce_pred_gradient_l2_norm(num_classes, num_features, temperature, include_bias):
    _, features, logits = _case(num_classes, num_features)
    expected = _oracle(num_classes, num_features, temperature, "ce_pred", 2.0, include_bias)
    _assert_close(reference.grodin_last_layer(logits, features, temperature, include_bias), -expected)
    _assert_close(scores.grodin_last_layer(logits, features, temperature, include_bias), -expected)


@pytest.mark.parametrize("num_classes,num_features,temperature", GRID)
@pytest.mark.parametrize("loss", reference.LOSSES)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_lastlayer_grad_norm_matches_autograd(num_classes, num_features, temperature, loss, p):
    if loss == "expected_ce" and num_classes == 1000 and (p != 1.0 or num_features == 512):
        pytest.skip("C backward passes per sample: the p=1 rows cover C=1000")
    _, features, logits = _case(num_classes, num_features)
    include_bias = p == 2.0  # both settings across the p values
    expected = _oracle(num_classes, num_features, temperature, loss, p, include_bias)
    _assert_close(reference.lastlayer_grad_norm(logits, features, loss, p, temperature, include_bias), expected)
    if (loss, p) in scores.KERNEL_GRAD_NORMS:
        _assert_close(scores.lastlayer_grad_norm(logits, features, loss, p, temperature, include_bias), expected)


def _confident_case(num_classes: int, num_features: int, temperature: float, seed: int):
    """Rows whose max softmax exceeds 1 - 1e-9: autograd's p_ŷ - 1 is round-off there."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, num_classes, generator=generator, dtype=torch.float64)
    logits[:, 0] += 40 * temperature
    features = torch.rand(4, num_features, generator=generator, dtype=torch.float64)
    assert (reference.msp(logits, temperature) > 1 - 1e-9).all()
    return logits, features


@pytest.mark.parametrize("num_classes", [2, 10, 1000])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1000.0])
@pytest.mark.parametrize("loss,p,include_bias", [
    ("kl_uniform", 1.0, False), ("ce_pred", 2.0, True), ("expected_ce", 1.0, False),
    ("energy", 1.0, False), ("ce_pred", 1.0, False), ("expected_ce", 2.0, True),
])
def test_confident_rows_match_high_precision(num_classes, temperature, loss, p, include_bias):
    logits, features = _confident_case(num_classes, 7, temperature, seed=num_classes)
    expected = torch.tensor(
        [mp_lastlayer_norm(f, v, loss, p, temperature, include_bias) for f, v in zip(logits, features)],
        dtype=torch.float64,
    )
    _assert_close(reference.lastlayer_grad_norm(logits, features, loss, p, temperature, include_bias), expected)
    if (loss, p) in scores.KERNEL_GRAD_NORMS:
        _assert_close(scores.lastlayer_grad_norm(logits, features, loss, p, temperature, include_bias), expected)


def test_confident_rows_are_where_autograd_loses_precision():
    """Why the high-precision reference is needed: autograd's CE gradient at a
    confident row is off by far more than 1e-9 relative."""
    layer, features = make_layer_and_features(10, 7, 1, seed=3)
    with torch.no_grad():
        layer.bias[0] += 40.0
    logits = logits_of(layer, features)
    exact = mp_lastlayer_norm(logits[0], features[0], "ce_pred", 2.0, 1.0, True)
    by_autograd = autograd_lastlayer_grad_norm(layer, features, "ce_pred", 2.0, 1.0, True).item()
    closed_form = -reference.grodin_last_layer(logits, features).item()
    assert abs(closed_form - exact) <= 1e-12 * exact
    assert abs(by_autograd - exact) > 1e-6 * exact
