"""gradood.knn_score against brute-force numpy (full sort of every distance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradood import knn


def _brute_force(queries: np.ndarray, bank: np.ndarray, k: int, metric: str) -> np.ndarray:
    normalise = lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)  # noqa: E731
    q, b = normalise(queries), normalise(bank)
    if metric == "cosine":
        return -np.sort(-(q @ b.T), axis=1)[:, k - 1]
    return -np.sort(((q[:, None, :] - b[None, :, :]) ** 2).sum(2), axis=1)[:, k - 1]


@settings(max_examples=60, deadline=None)
@given(
    queries=st.integers(1, 9),
    bank=st.integers(1, 40),
    dim=st.integers(1, 6),
    k_fraction=st.floats(0, 1),
    metric=st.sampled_from(knn.METRICS),
    seed=st.integers(0, 2**31 - 1),
    zero_row=st.booleans(),
)
def test_matches_brute_force(queries, bank, dim, k_fraction, metric, seed, zero_row):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((queries, dim))
    b = rng.standard_normal((bank, dim))
    if zero_row:
        q[0] = 0.0
    k = 1 + int(k_fraction * (bank - 1))
    expected = _brute_force(q, b, k, metric)
    actual = knn.knn_score(torch.from_numpy(q), knn.normalise_rows(torch.from_numpy(b)), k, metric)
    np.testing.assert_allclose(actual.numpy(), expected, rtol=0, atol=1e-12)


def test_blocks_of_the_bank_give_the_same_result(monkeypatch):
    rng = np.random.default_rng(0)
    q, b = rng.standard_normal((7, 5)), rng.standard_normal((50, 5))
    whole = knn.knn_score(torch.from_numpy(q), knn.normalise_rows(torch.from_numpy(b)), 6)
    monkeypatch.setattr(knn, "_BLOCK_ELEMENTS", 7)  # blocks of k = 6 bank rows
    blocked = knn.knn_score(torch.from_numpy(q), knn.normalise_rows(torch.from_numpy(b)), 6)
    torch.testing.assert_close(whole, blocked, rtol=0, atol=1e-14)
    np.testing.assert_allclose(whole.numpy(), _brute_force(q, b, 6, "squared_l2"), rtol=0, atol=1e-12)


def test_float32_inputs_score_in_float32_and_half_in_float32():
    q, b = torch.randn(3, 4), knn.normalise_rows(torch.randn(10, 4))
    assert knn.knn_score(q, b, 2).dtype == torch.float32
    assert knn.knn_score(q.bfloat16(), b.bfloat16(), 2).dtype == torch.float32


def test_errors():
    bank = knn.normalise_rows(torch.randn(5, 3))
    with pytest.raises(ValueError, match="metric must be one of"):
        knn.knn_score(torch.randn(2, 3), bank, 1, "l1")
    with pytest.raises(ValueError, match="must share K"):
        knn.knn_score(torch.randn(2, 4), bank, 1)
    for k in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match=r"k must be an integer in \[1, 5\]"):
            knn.knn_score(torch.randn(2, 3), bank, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    q, b = torch.randn(64, 16, dtype=torch.float64), knn.normalise_rows(torch.randn(1000, 16, dtype=torch.float64))
    torch.testing.assert_close(knn.knn_score(q.cuda(), b.cuda(), 5).cpu(), knn.knn_score(q, b, 5))
