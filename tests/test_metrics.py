"""gradood.metrics against brute-force definitions and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradood import metrics

# Brute-force definitions (docs/conventions.md, "Metrics") ---------------------------------


def brute_auroc(id_scores, ood_scores):
    id_scores, ood_scores = np.asarray(id_scores, float), np.asarray(ood_scores, float)
    wins = (id_scores[:, None] > ood_scores[None, :]).sum()
    ties = (id_scores[:, None] == ood_scores[None, :]).sum()
    return (wins + 0.5 * ties) / (id_scores.size * ood_scores.size)


def brute_fpr(positives, negatives, tpr=0.95):
    """Largest threshold keeping >= tpr of positives at or above it; share of negatives there."""
    positives, negatives = np.asarray(positives, float), np.asarray(negatives, float)
    best = None
    for threshold in np.unique(positives):
        if np.mean(positives >= threshold) >= tpr - 1e-15 and (best is None or threshold > best):
            best = threshold
    return float(np.mean(negatives >= best))


def brute_average_precision(positives, negatives):
    positives, negatives = np.asarray(positives, float), np.asarray(negatives, float)
    total, previous_recall = 0.0, 0.0
    for threshold in np.unique(np.concatenate([positives, negatives]))[::-1]:
        true_positives = np.sum(positives >= threshold)
        false_positives = np.sum(negatives >= threshold)
        recall = true_positives / positives.size
        total += (recall - previous_recall) * true_positives / (true_positives + false_positives)
        previous_recall = recall
    return total


def brute_detection_error(id_scores, ood_scores):
    id_scores, ood_scores = np.asarray(id_scores, float), np.asarray(ood_scores, float)
    errors = [0.5]
    for threshold in np.unique(np.concatenate([id_scores, ood_scores])):
        errors.append(0.5 * (1 - np.mean(id_scores >= threshold)) + 0.5 * np.mean(ood_scores >= threshold))
    return min(errors)


METRICS = {
    "auroc": (metrics.auroc, brute_auroc),
    "fpr_at_95_tpr": (metrics.fpr_at_95_tpr, lambda i, o: brute_fpr(i, o)),
    "fpr_at_95_tpr_ood_positive": (metrics.fpr_at_95_tpr_ood_positive, lambda i, o: brute_fpr(-np.asarray(o), -np.asarray(i))),
    "aupr_in": (metrics.aupr_in, lambda i, o: brute_average_precision(i, o)),
    "aupr_out": (metrics.aupr_out, lambda i, o: brute_average_precision(-np.asarray(o), -np.asarray(i))),
    "detection_error": (metrics.detection_error, brute_detection_error),
}


def _random_scores(seed, id_size, ood_size, kind):
    rng = np.random.default_rng(seed)
    if kind == "continuous":
        return rng.normal(1.0, 1.0, id_size), rng.normal(0.0, 1.5, ood_size)
    if kind == "ties":
        return rng.integers(0, 6, id_size).astype(float), rng.integers(-1, 4, ood_size).astype(float)
    values = np.array([-np.inf, -1.0, 0.0, 2.0, np.inf])  # infinities
    return rng.choice(values, id_size, p=[0.1, 0.1, 0.2, 0.3, 0.3]), rng.choice(values, ood_size, p=[0.3, 0.3, 0.2, 0.1, 0.1])


@pytest.mark.parametrize("name", METRICS)
@pytest.mark.parametrize("kind", ["continuous", "ties", "infinities"])
@pytest.mark.parametrize("sizes", [(1, 1), (1, 7), (20, 3), (137, 251), (400, 400)])
def test_metric_matches_brute_force(name, kind, sizes):
    ours, brute = METRICS[name]
    id_scores, ood_scores = _random_scores(sum(sizes), *sizes, kind)
    assert ours(id_scores, ood_scores) == pytest.approx(brute(id_scores, ood_scores), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", METRICS)
def test_metric_matches_brute_force_on_a_million_samples(name):
    """10^6 scores from a small set of values (many ties, ±inf): the brute force
    loops over the distinct values; AUROC's is a contingency table."""
    rng = np.random.default_rng(11)
    values = np.concatenate([[-np.inf], np.arange(40.0), [np.inf]])
    id_scores = rng.choice(values, 600_000) + rng.integers(0, 3, 600_000)
    ood_scores = rng.choice(values, 400_000)
    ours, brute = METRICS[name]
    if name == "auroc":
        grid = np.unique(np.concatenate([id_scores, ood_scores]))
        id_counts = np.array([np.sum(id_scores == v) for v in grid])
        ood_counts = np.array([np.sum(ood_scores == v) for v in grid])
        below = np.cumsum(ood_counts) - ood_counts  # OOD strictly below each value
        expected = (np.sum(id_counts * below) + 0.5 * np.sum(id_counts * ood_counts)) / (id_scores.size * ood_scores.size)
    else:
        expected = brute(id_scores, ood_scores)
    assert ours(id_scores, ood_scores) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_auroc_by_hand():
    assert metrics.auroc([0.9, 0.8, 0.7], [0.75, 0.1]) == pytest.approx(5 / 6, rel=1e-15)
    assert metrics.auroc([1.0, 2.0], [2.0, 0.0]) == 0.625
    assert metrics.auroc([math.inf], [math.inf, -math.inf]) == 0.75


def test_fpr_at_95_tpr_by_hand():
    id_scores = np.arange(1.0, 21.0)  # ceil(0.95 * 20) = 19 -> threshold 2
    assert metrics.fpr_at_95_tpr(id_scores, [5.5, 0.0, 19.5, 0.5]) == 0.5
    assert metrics.fpr_at_95_tpr(np.arange(1.0, 101.0), [5.0, 6.0]) == 0.5  # threshold 6, not 7


def test_the_two_fpr95_conventions_differ():
    id_scores, ood_scores = _random_scores(3, 500, 500, "continuous")
    assert metrics.fpr_at_95_tpr(id_scores, ood_scores) != pytest.approx(
        metrics.fpr_at_95_tpr_ood_positive(id_scores, ood_scores)
    )


def test_aupr_and_detection_error_by_hand():
    assert metrics.aupr_in([3.0, 1.0], [2.0]) == pytest.approx(0.5 + 0.5 * 2 / 3, rel=1e-15)
    assert metrics.aupr_out([3.0, 1.0], [2.0]) == pytest.approx(0.5, rel=1e-15)  # OOD 2 ranks second of three
    assert metrics.detection_error([3.0, 1.0], [2.0]) == 0.25


def test_perfect_and_reversed_separation():
    assert metrics.auroc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert metrics.auroc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert metrics.fpr_at_95_tpr([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert metrics.aupr_in([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert metrics.detection_error([2.0, 3.0], [0.0, 1.0]) == 0.0


def test_inputs_may_be_tensors_arrays_or_lists():
    id_list, ood_list = [0.3, 2.0, 1.0], [0.5, -1.0]
    expected = metrics.auroc(id_list, ood_list)
    assert metrics.auroc(np.array(id_list), np.array(ood_list)) == expected
    assert metrics.auroc(torch.tensor(id_list, dtype=torch.bfloat16), torch.tensor(ood_list)) == expected


@pytest.mark.parametrize("name", METRICS)
def test_nan_scores_raise_with_their_count(name):
    with pytest.raises(ValueError, match="2 NaN score"):
        METRICS[name][0]([1.0, math.nan, math.nan], [0.0])
    with pytest.raises(ValueError, match="ood_scores contains 1 NaN"):
        METRICS[name][0]([1.0], [math.nan, 0.0])


@pytest.mark.parametrize("name", METRICS)
def test_empty_and_non_1d_inputs_raise(name):
    with pytest.raises(ValueError, match="id_scores is empty"):
        METRICS[name][0]([], [0.0])
    with pytest.raises(ValueError, match="must be 1-D"):
        METRICS[name][0]([[1.0, 2.0]], [0.0])


def test_bootstrap_is_reproducible_and_centred():
    id_scores, ood_scores = _random_scores(5, 300, 200, "continuous")
    first = metrics.bootstrap(metrics.auroc, id_scores, ood_scores, n=50, seed=1)
    assert first == metrics.bootstrap(metrics.auroc, id_scores, ood_scores, n=50, seed=1)
    assert first != metrics.bootstrap(metrics.auroc, id_scores, ood_scores, n=50, seed=2)
    assert abs(first.mean - metrics.auroc(id_scores, ood_scores)) < 3 * first.std
    assert 0 < first.std < 0.05


def test_bootstrap_matches_a_literal_resampling_loop():
    id_scores, ood_scores = _random_scores(6, 40, 30, "ties")
    rng = np.random.default_rng(0)
    values = []
    for _ in range(20):
        id_sample = id_scores[rng.integers(0, 40, 40)]
        ood_sample = ood_scores[rng.integers(0, 30, 30)]
        values.append(brute_auroc(id_sample, ood_sample))
    result = metrics.bootstrap(metrics.auroc, id_scores, ood_scores, n=20, seed=0)
    assert result.mean == pytest.approx(np.mean(values), rel=1e-12)
    assert result.std == pytest.approx(np.std(values, ddof=1), rel=1e-12)


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n must be an integer >= 2"):
        metrics.bootstrap(metrics.auroc, [1.0], [0.0], n=1)
    with pytest.raises(TypeError, match="metric must be callable"):
        metrics.bootstrap("auroc", [1.0], [0.0])
    with pytest.raises(ValueError, match="NaN"):
        metrics.bootstrap(metrics.auroc, [math.nan], [0.0])


# Property tests -----------------------------------------------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_scores = st.lists(st.integers(-5, 5).map(float) | st.floats(-10, 10, allow_nan=False), min_size=1, max_size=40)


@given(_scores, _scores)
def test_auroc_of_swapped_sets_is_the_complement(id_scores, ood_scores):
    assert metrics.auroc(id_scores, ood_scores) + metrics.auroc(ood_scores, id_scores) == pytest.approx(1.0, abs=1e-12)


@given(_scores, _scores)
def test_rank_metrics_are_invariant_to_increasing_maps(id_scores, ood_scores):
    def transform(values):  # strictly increasing also in floating point (an exact scaling)
        return [4.0 * v for v in values]

    for metric in (metrics.auroc, metrics.fpr_at_95_tpr, metrics.aupr_in, metrics.detection_error):
        assert metric(transform(id_scores), transform(ood_scores)) == pytest.approx(metric(id_scores, ood_scores), abs=1e-12)


@given(_scores, _scores)
def test_ood_positive_variants_are_the_id_positive_ones_with_roles_swapped(id_scores, ood_scores):
    negated_id, negated_ood = [-v for v in id_scores], [-v for v in ood_scores]
    assert metrics.fpr_at_95_tpr_ood_positive(id_scores, ood_scores) == metrics.fpr_at_95_tpr(negated_ood, negated_id)
    assert metrics.aupr_out(id_scores, ood_scores) == metrics.aupr_in(negated_ood, negated_id)


@pytest.mark.parametrize("make", [lambda v: torch.tensor(v, dtype=torch.complex64), lambda v: np.array(v, dtype=complex),
                                  lambda v: [complex(x) for x in v]])
def test_complex_scores_are_refused(make):
    """They used to be cast with a warning, dropping the imaginary part."""
    with pytest.raises(TypeError, match="must be real scores, got complex values"):
        metrics.auroc(make([1.0, 2.0, 3.0]), [0.5, 0.1])
