"""gradood.scores (the compiled lastlayer_terms op) against gradood.reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradood
from gradood import reference, scores

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (B, C, D); C <= 32 takes the CPU's 16-rows-at-a-time path, in full and partial tiles
    (1, 1, 1), (3, 2, 7), (5, 10, 1), (37, 32, 5), (17, 33, 65), (4, 1000, 512), (2, 21843, 33), (64, 10, 2048),
]
# Inputs of every dtype are upcast exactly, so the error is the accumulator's;
# it grows with the number of classes summed (in float32 for non-float64 inputs).
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


def _rtol(dtype, num_classes):
    return RTOL[dtype] * (1 + num_classes / 1000)

# name -> (needs features, keyword arguments)
SCORES = {
    "msp": (False, {"temperature": 2.0}),
    "max_logit": (False, {}),
    "energy": (False, {"temperature": 0.5}),
    "gradnorm": (True, {"temperature": 1.0}),
    "gradnorm_official_bias": (True, {"temperature": 3.0, "scale": "official", "include_bias": True}),
    "exgrad": (True, {"temperature": 1.0}),
    "grodin_last_layer": (True, {"temperature": 1000.0}),
    "grodin_last_layer_no_bias": (True, {"temperature": 1.0, "include_bias": False}),
    "rg": (True, {"clip": 0.8, "temperature": 1.0}),
    "rg_additive": (True, {"clip": 1.2, "alpha": 0.6}),
    "uv_energy_l1": (True, {"u": "energy", "v": "l1"}),
    "uv_msp_l2": (True, {"u": "msp", "v": "l2", "temperature": 2.0}),
    "uv_gradnorm_clipped": (True, {"u": "gradnorm", "v": "clipped_l1", "clip": 0.5}),
    "uv_exgrad_l2": (True, {"u": "exgrad", "v": "l2"}),
    "uv_max_logit_l1": (True, {"u": "max_logit", "v": "l1"}),
}


def _function(module, name):
    base = name.split("_official")[0].split("_no_bias")[0]
    if base.startswith("uv_"):
        base = "uv"
    return getattr(module, base)


def _inputs(batch, num_classes, num_features, dtype, seed=0, scale=4.0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, num_classes, generator=generator) * scale).to(dtype)
    features = (torch.randn(batch, num_features, generator=generator).relu() * 1.5).to(dtype)
    return logits, features


def _compare(name, logits, features):
    needs_features, kwargs = SCORES[name]
    ours_args = (logits, features) if needs_features else (logits,)
    ref_args = tuple(x.double() for x in ours_args)
    ours = _function(scores, name)(*ours_args, **kwargs)
    expected = _function(reference, name)(*ref_args, **kwargs)
    expected_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert ours.dtype == expected_dtype and ours.shape == (logits.shape[0],)
    torch.testing.assert_close(ours.double(), expected, rtol=_rtol(logits.dtype, logits.shape[1]), atol=1e-6 if logits.dtype != torch.float64 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", SCORES)
def test_scores_match_reference(name, shape, dtype, device):
    logits, features = _inputs(*shape, dtype)
    _compare(name, logits.to(device), features.to(device))


@pytest.mark.parametrize("name", SCORES)
def test_scores_match_reference_on_non_contiguous_inputs(name, device):
    logits_t, features_wide = _inputs(40, 12, 2 * 9, torch.float32, seed=3)
    logits = logits_t.reshape(12, 40).t().to(device)  # transposed view
    features = features_wide[:, ::2].to(device)  # strided view
    assert not logits.is_contiguous() and not features.is_contiguous()
    _compare(name, logits, features)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", SCORES)
def test_scores_match_reference_on_confident_and_uniform_rows(name, dtype, device):
    logits, features = _inputs(6, 50, 16, torch.float64, seed=5)
    logits[0:2] = 0.0  # uniform predictions
    logits[2:4, 7] += 200.0  # confident beyond float64's 1 - p resolution
    logits[4, [3, 9]] = 30.0  # a tie at the max
    _compare(name, logits.to(dtype).to(device), features.to(dtype).to(device))


@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 1e4), (torch.float16, 6e4), (torch.bfloat16, 1e4)])
def test_large_logits_give_finite_terms(dtype, magnitude, device):
    logits, features = _inputs(8, 100, 32, torch.float32, seed=7)
    logits = (logits.sign() * magnitude).to(dtype).to(device)
    result = gradood.lastlayer_terms(logits, features.to(dtype).to(device), temperature=1.0)
    assert torch.isfinite(result.terms).all()
    _compare("energy", logits, features.to(dtype).to(device))
    _compare("grodin_last_layer", logits, features.to(dtype).to(device))


def test_nan_logit_affects_only_its_row(device):
    logits, features = _inputs(5, 20, 8, torch.float32, seed=9)
    clean = gradood.lastlayer_terms(logits.to(device), features.to(device), 2.0, 1.0)
    logits[2, 4] = math.nan
    dirty = gradood.lastlayer_terms(logits.to(device), features.to(device), 2.0, 1.0)
    logit_columns = slice(0, gradood._ops.NUM_LOGIT_TERMS)
    assert torch.isnan(dirty.terms[2, logit_columns]).all()
    assert dirty.argmax[2].item() == 4
    rows = [0, 1, 3, 4]
    torch.testing.assert_close(dirty.terms[rows], clean.terms[rows], rtol=0, atol=0)
    torch.testing.assert_close(dirty.terms[2, gradood._ops.NUM_LOGIT_TERMS:], clean.terms[2, gradood._ops.NUM_LOGIT_TERMS:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("num_classes", [8, 300])
def test_non_finite_rows_inside_a_tile_leave_the_others_exact(dtype, num_classes, device):
    """Rows 3 (NaN) and 5 (+inf) take the scalar path; the rows after them in the
    same tile, and their features, must come out as in a clean batch."""
    logits, features = _inputs(20, num_classes, 6, torch.float32, seed=11)
    logits, features = logits.to(dtype).to(device), features.to(dtype).to(device)
    clean = gradood.lastlayer_terms(logits, features, 1.5, 0.7)
    logits[3, 2] = math.nan
    logits[5, 1] = math.inf
    dirty = gradood.lastlayer_terms(logits, features, 1.5, 0.7)
    others = [r for r in range(20) if r not in (3, 5)]
    torch.testing.assert_close(dirty.terms[others], clean.terms[others], rtol=0, atol=0)
    assert torch.isnan(dirty.terms[3, :gradood._ops.NUM_LOGIT_TERMS]).all()
    assert dirty.terms[5, 1].item() == math.inf and dirty.argmax[5].item() == 1
    torch.testing.assert_close(dirty.terms[[3, 5], gradood._ops.NUM_LOGIT_TERMS:], clean.terms[[3, 5], gradood._ops.NUM_LOGIT_TERMS:])


def test_nan_feature_affects_only_its_row_and_feature_terms(device):
    logits, features = _inputs(4, 6, 8, torch.float32, seed=10)
    clean = gradood.lastlayer_terms(logits.to(device), features.to(device), 1.0, 0.5)
    features[1, 3] = math.nan
    dirty = gradood.lastlayer_terms(logits.to(device), features.to(device), 1.0, 0.5)
    first_feature = gradood._ops.NUM_LOGIT_TERMS
    assert torch.isnan(dirty.terms[1, first_feature:]).all()
    torch.testing.assert_close(dirty.terms[1, :first_feature], clean.terms[1, :first_feature], rtol=0, atol=0)
    torch.testing.assert_close(dirty.terms[[0, 2, 3]], clean.terms[[0, 2, 3]], rtol=0, atol=0)


def test_infinite_logits_give_limits(device):
    logits = torch.tensor([[0.0, -math.inf, 1.0], [math.inf, 0.0, 2.0]], device=device)
    result = gradood.lastlayer_terms(logits, None, 1.0)
    energy = result.column("energy").cpu()
    assert energy[0].item() == pytest.approx(math.log(1 + math.e), rel=1e-6)
    assert energy[1].item() == math.inf and result.column("max_softmax")[1].item() == 1.0


# Rows without a finite max, and the one-class rows where no other logit carries a NaN.
_NAN, _INF = math.nan, math.inf
_NON_FINITE_ROWS = [
    [_NAN], [_INF], [-_INF], [_INF, 1.0], [-_INF, -_INF], [_INF, _INF], [_NAN, 1.0], [_INF, -_INF],
    [-_INF, _NAN], [_INF, _INF, 1.0], [-_INF, 2.0, -_INF], [_INF, _NAN, _INF],
]


def _non_finite_batch(row, num_classes, dtype, seed):
    """A batch of random rows with `row` (padded with -inf, which has probability 0, or
    repeated when it has one logit) in the middle of a tile, so the short-row tile, the
    vectorised row and the scalar path each meet it among finite rows."""
    logits, features = _inputs(21, num_classes, 9, torch.float64, seed=seed)
    values = torch.tensor(row, dtype=torch.float64)
    if len(row) == 1:
        values = values.repeat(num_classes)
    else:
        values = torch.cat([values, torch.full((num_classes - len(row),), -_INF, dtype=torch.float64)])
        values = values[torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))]
    logits[5] = values
    return logits.to(dtype), features.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_classes", [1, 3, 40, 1000])
@pytest.mark.parametrize("name", SCORES)
def test_every_score_of_a_non_finite_row_is_the_reference_limit(name, num_classes, dtype, device):
    """One +inf logit has probability 1, tied maxima share it, a row of -inf is uniform, a
    NaN logit gives NaN, for every score and on every kernel path. The kernels gave MSP 1.0
    for a one-class NaN row and NaN GradNorm/ExGrad for tied infinite maxima, while MSP took
    the limit; the reference gave NaN for every infinite max (torch.softmax's inf - inf)."""
    needs_features, kwargs = SCORES[name]
    for index, row in enumerate(_NON_FINITE_ROWS):
        if len(row) > num_classes:
            continue
        logits, features = _non_finite_batch(row, num_classes, dtype, seed=index)
        args = (logits.to(device), features.to(device)) if needs_features else (logits.to(device),)
        ours = _function(scores, name)(*args, **kwargs).double().cpu()
        expected = _function(reference, name)(*(x.double() for x in args), **kwargs).cpu()
        assert torch.equal(ours.isnan(), expected.isnan()), (row, ours[5], expected[5])
        assert torch.equal(ours.isinf(), expected.isinf()) and torch.equal(ours[ours.isinf()], expected[expected.isinf()])
        finite = expected.isfinite()
        # Near-zero scores (GradNorm of a uniform row) carry the round-off of the batch's scale.
        atol = (1e-12 if dtype == torch.float64 else 1e-5) * (1 + expected[finite].abs().max().item())
        torch.testing.assert_close(ours[finite], expected[finite], rtol=_rtol(dtype, num_classes), atol=atol)


@pytest.mark.parametrize("name", [n for n, (_, kwargs) in SCORES.items() if "temperature" in kwargs])
def test_scores_at_a_temperature_where_f_over_t_overflows_match_the_reference(name, device):
    """f / T = ±inf at a finite max: the kernels take exponents relative to the max; the
    reference divided first (MSP NaN, energy inf where the kernel's 1e10 is the limit)."""
    needs_features, kwargs = SCORES[name]
    logits = torch.tensor([[1e10, 0.0], [-1e10, -1e10], [1e10, 5e9], [3.0, 3.0]], dtype=torch.float64)
    features = torch.rand(4, 3, dtype=torch.float64)
    args = (logits.to(device), features.to(device)) if needs_features else (logits.to(device),)
    kwargs = dict(kwargs, temperature=1e-300)
    torch.testing.assert_close(_function(scores, name)(*args, **kwargs).cpu(),
                               _function(reference, name)(*(a.cpu() for a in args), **kwargs), rtol=1e-12, atol=0)


def test_raw_ops_accept_an_empty_batch(device):
    terms, argmax = torch.ops.gradood.lastlayer_terms(torch.empty(0, 5, device=device), None, 1.0, 1.0)
    assert terms.shape == (0, gradood._ops.NUM_LOGIT_TERMS) and argmax.shape == (0,)
    score = torch.ops.gradood.lastlayer_score(
        torch.empty(0, 5, device=device), torch.empty(0, 3, device=device), 1, 1.0, 8, False, 0, 0.0, 1.0, 1.0
    )
    assert score.shape == (0,)


def test_argmax_is_the_first_maximum(device):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], device=device)
    assert gradood.lastlayer_terms(logits).argmax.tolist() == [1, 0]


def test_one_pass_gives_every_score(device):
    logits, features = _inputs(9, 11, 13, torch.float32, seed=12)
    logits, features = logits.to(device), features.to(device)
    terms = gradood.lastlayer_terms(logits, features, temperature=1.0, clip=1.0)
    torch.testing.assert_close(terms.column("energy") * terms.column("feature_clipped_l1"), scores.rg(logits, features))
    torch.testing.assert_close(terms.column("max_softmax"), scores.msp(logits))
    assert terms.argmax.tolist() == logits.argmax(1).tolist()


def test_column_without_features_raises():
    with pytest.raises(ValueError, match="needs features"):
        gradood.lastlayer_terms(torch.randn(2, 3)).column("feature_l1")


def test_react_matches_reference(device):
    generator = torch.Generator().manual_seed(13)
    features = torch.randn(7, 16, generator=generator).relu().to(device)
    weight = torch.randn(5, 16, generator=generator).to(device)
    bias = torch.randn(5, generator=generator).to(device)
    torch.testing.assert_close(scores.react(features, weight, bias, 0.7), reference.react(features, weight, bias, 0.7))


def test_kl_matching_is_the_reference(device):
    logits = torch.randn(4, 3, device=device)
    templates = torch.softmax(torch.randn(3, 3, device=device), dim=1)
    torch.testing.assert_close(scores.kl_matching(logits, templates), reference.kl_matching(logits, templates))


def test_unsupported_grad_norm_pair_points_to_reference():
    logits, features = torch.randn(2, 3), torch.rand(2, 4)
    with pytest.raises(ValueError, match="gradood.reference.lastlayer_grad_norm"):
        scores.lastlayer_grad_norm(logits, features, "ce_pred", 3.0)


# Property tests -----------------------------------------------------------

_shapes = st.tuples(st.integers(1, 6), st.integers(1, 40), st.integers(1, 40))
_floats = st.floats(-30, 30, allow_nan=False, width=32)


@st.composite
def _logits_and_features(draw):
    batch, num_classes, num_features = draw(_shapes)
    logits = torch.tensor(draw(st.lists(_floats, min_size=batch * num_classes, max_size=batch * num_classes)), dtype=torch.float64)
    features = torch.tensor(
        draw(st.lists(st.floats(0, 10, width=32), min_size=batch * num_features, max_size=batch * num_features)),
        dtype=torch.float64,
    )
    return logits.reshape(batch, num_classes), features.reshape(batch, num_features)


@given(_logits_and_features(), st.floats(-50, 50), st.sampled_from([0.5, 1.0, 7.0]))
def test_msp_and_gradnorm_invariant_to_a_constant_shift(data, shift, temperature):
    logits, features = data
    torch.testing.assert_close(scores.msp(logits + shift, temperature), scores.msp(logits, temperature), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        scores.gradnorm(logits + shift, features, temperature), scores.gradnorm(logits, features, temperature), rtol=1e-9, atol=1e-9
    )


@given(_logits_and_features(), st.sampled_from([0.5, 1.0, 3.0]))
def test_rg_with_infinite_clip_is_energy_times_l1(data, temperature):
    logits, features = data
    torch.testing.assert_close(
        scores.rg(logits, features, clip=math.inf, temperature=temperature),
        scores.energy(logits, temperature) * features.abs().sum(1),
    )


@given(_logits_and_features(), st.sampled_from(sorted(SCORES)))
def test_scores_match_reference_on_arbitrary_inputs(data, name):
    _compare(name, *data)


@given(_logits_and_features())
def test_terms_stay_in_their_ranges(data):
    logits, features = data
    terms = gradood.lastlayer_terms(logits, features)
    num_classes = logits.shape[1]
    msp = terms.column("max_softmax")
    assert ((msp >= 1 / num_classes - 1e-12) & (msp <= 1)).all()
    assert (terms.column("uniform_deviation_l1") <= 2 * (1 - 1 / num_classes) + 1e-12).all()
    assert (terms.column("gini") >= -1e-15).all() and (terms.column("gini") <= 1 - 1 / num_classes + 1e-12).all()
    assert (terms.column("feature_clipped_l1") <= terms.column("feature_l1") + 1e-12).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("classes", [3, 40, 1000])  # the short-row tile, the vectorised row and blocks
def test_energy_of_rows_with_tied_infinite_logits_is_their_log_sum_exp(device, dtype, classes):
    """Two +inf logits: log-sum-exp is +inf; all -inf: -inf. The max-subtracted merge took
    inf - inf = NaN as the rescale of the second maximum, so every energy-based score
    (Energy, RG, RGAdditive, ReAct) was NaN on such rows."""
    logits = torch.randn(4, classes, dtype=dtype, device=device)
    logits[0, [0, classes - 1]] = math.inf
    logits[1] = -math.inf
    logits[2, 1] = math.inf
    expected = torch.logsumexp(logits.double().cpu(), dim=1)
    for temperature in (1.0, 2.0):
        energy = gradood.lastlayer_terms(logits, None, temperature).column("energy").double().cpu()
        assert energy[0].item() == math.inf and energy[1].item() == -math.inf and energy[2].item() == math.inf
        torch.testing.assert_close(energy[3] / temperature, torch.logsumexp(logits[3].double().cpu() / temperature, 0),
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(expected[:3], torch.tensor([math.inf, -math.inf, math.inf], dtype=torch.float64))
    torch.testing.assert_close(gradood.scores.energy(logits).double().cpu()[:3], expected[:3])


@pytest.mark.parametrize("num_classes", [3, 40, 21843])
def test_minus_infinity_logits_get_exactly_zero_probability(num_classes):
    """The vector exponential underflows to 0, not to exp(-87.3) ~ 1.2e-38: summed over
    21,842 classes that floor made gini 16x its float64 value (and collapsed confident rows)."""
    logits = torch.full((2, num_classes), -float("inf"))
    logits[:, 0] = 0.0
    logits[1, 1] = -80.0
    terms = gradood.lastlayer_terms(logits)
    exact = gradood.lastlayer_terms(logits.double())
    torch.testing.assert_close(terms.column("gini").double(), exact.column("gini"), rtol=1e-5, atol=0)
    assert float(terms.column("gini")[0]) == 0.0 and float(terms.column("max_softmax")[0]) == 1.0
