"""gradood.reference on hand-computed values and on the identities between scores."""

from __future__ import annotations

import math

import pytest
import torch

from gradood import reference


def _row(values):
    return torch.tensor([values], dtype=torch.float64)


LOGITS = _row([1.0, 3.0, 2.0])
FEATURES = _row([0.5, 2.0, 0.0, 1.5])


def _softmax(values, temperature=1.0):
    exps = [math.exp(x / temperature) for x in values]
    return [e / sum(exps) for e in exps]


def test_msp_energy_max_logit_by_hand():
    probs = _softmax([1.0, 3.0, 2.0], 2.0)
    assert reference.msp(LOGITS, 2.0).item() == pytest.approx(probs[1], rel=1e-15)
    assert reference.max_logit(LOGITS).item() == 3.0
    expected_energy = 2.0 * math.log(sum(math.exp(x / 2.0) for x in [1.0, 3.0, 2.0]))
    assert reference.energy(LOGITS, 2.0).item() == pytest.approx(expected_energy, rel=1e-15)


def test_gradnorm_by_hand():
    probs = _softmax([1.0, 3.0, 2.0])
    expected = sum(abs(p - 1 / 3) for p in probs) * 4.0
    assert reference.gradnorm(LOGITS, FEATURES).item() == pytest.approx(expected, rel=1e-14)
    assert reference.gradnorm(LOGITS, FEATURES, scale="official").item() == pytest.approx(3 * expected, rel=1e-14)


def test_rg_is_energy_times_clipped_l1():
    expected = reference.energy(LOGITS, 2.0).item() * (0.5 + 1.0 + 0.0 + 1.0)
    assert reference.rg(LOGITS, FEATURES, clip=1.0, temperature=2.0).item() == pytest.approx(expected, rel=1e-15)


def test_rg_clips_magnitudes_of_signed_features():
    signed = _row([-3.0, 0.25])
    assert reference.rg(_row([0.0]), signed, clip=1.0).item() == pytest.approx(0.0)
    expected = reference.energy(_row([1.0, 1.0])).item() * 1.25
    assert reference.rg(_row([1.0, 1.0]), signed, clip=1.0).item() == pytest.approx(expected, rel=1e-15)


def test_rg_additive_by_hand():
    expected = math.log(sum(math.exp(x) for x in [1.0, 3.0, 2.0])) + 0.6 * 2.5
    assert reference.rg_additive(LOGITS, FEATURES, clip=1.0, alpha=0.6).item() == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("u,score", [
    ("gradnorm", lambda f, v, t: reference.gradnorm(f, v, t)),
    ("exgrad", lambda f, v, t: reference.exgrad(f, v, t)),
    ("energy", lambda f, v, t: reference.energy(f, t) * v.abs().sum(1)),
    ("msp", lambda f, v, t: reference.msp(f, t) * v.abs().sum(1)),
    ("max_logit", lambda f, v, t: reference.max_logit(f) * v.abs().sum(1)),
])
def test_uv_l1_members_are_the_named_scores(u, score):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    features = torch.rand(6, 5, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(reference.uv(logits, features, u=u, v="l1", temperature=1.5), score(logits, features, 1.5))


def test_uv_energy_clipped_l1_is_rg():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    features = torch.rand(6, 5, generator=generator, dtype=torch.float64) * 2
    torch.testing.assert_close(
        reference.uv(logits, features, u="energy", v="clipped_l1", clip=0.7, temperature=3.0),
        reference.rg(logits, features, clip=0.7, temperature=3.0),
    )


def test_uv_l2_is_the_euclidean_feature_norm():
    logits, features = _row([0.0, 0.0]), _row([3.0, 4.0])
    assert reference.uv(logits, features, u="msp", v="l2").item() == pytest.approx(0.5 * 5.0)


def test_react_by_hand():
    weight = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=torch.float64)
    bias = torch.tensor([0.1, -0.2], dtype=torch.float64)
    features = _row([3.0, 0.4])
    clipped = [1.0, 0.4]
    logits = [1.0 * clipped[0] - 1.0 * clipped[1] + 0.1, 0.5 * clipped[0] + 2.0 * clipped[1] - 0.2]
    expected = math.log(sum(math.exp(x) for x in logits))
    assert reference.react(features, weight, bias, clip=1.0).item() == pytest.approx(expected, rel=1e-15)
    no_bias = math.log(sum(math.exp(x) for x in [0.6, 1.3]))
    assert reference.react(features, weight, None, clip=1.0).item() == pytest.approx(no_bias, rel=1e-15)


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


@pytest.mark.parametrize("mode", ["min", "predicted"])
def test_kl_matching_by_hand(mode):
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    templates = torch.softmax(torch.randn(4, 4, generator=generator, dtype=torch.float64), dim=1)
    expected = []
    for row in logits.tolist():
        probs = _softmax(row)
        divergences = [_kl(probs, template) for template in templates.tolist()]
        expected.append(-(min(divergences) if mode == "min" else divergences[row.index(max(row))]))
    torch.testing.assert_close(reference.kl_matching(logits, templates, mode), torch.tensor(expected, dtype=torch.float64))


def test_kl_matching_is_zero_at_a_matching_template():
    logits = _row([0.3, -1.0, 2.0])
    templates = torch.cat([torch.softmax(logits, dim=1), torch.full((1, 3), 1 / 3, dtype=torch.float64)])
    assert reference.kl_matching(logits, templates).item() == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("name", ["msp", "energy", "gradnorm", "exgrad", "grodin_last_layer", "rg"])
def test_temperature_changes_scores_as_documented(name):
    """T enters every temperature-aware score (guards against an ignored argument)."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    features = torch.rand(3, 4, generator=generator, dtype=torch.float64)
    function = getattr(reference, name)
    args = (logits,) if name in ("msp", "energy") else (logits, features)
    at_one = function(*args, temperature=1.0)
    at_three = function(*args, temperature=3.0)
    assert not torch.allclose(at_one, at_three)
