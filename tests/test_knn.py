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


@pytest.mark.parametrize("dim", [8, 512])
def test_float32_distances_of_near_duplicates_are_exact(dim):
    """Queries a hair (1e-5) from their bank rows: ‖q‖² + ‖b‖² − 2 q·b in float32 gave 0 or
    ~1e-7 for true distances of ~1e-10 (every near-duplicate tied at score 0). The refined
    distances equal float64 ones on the same float32 vectors to 1e-6 relative."""
    generator = torch.Generator().manual_seed(0)
    bank = knn.normalise_rows(torch.randn(300, dim, generator=generator))
    queries = bank[:40] + 1e-5 * torch.randn(40, dim, generator=generator) * torch.rand(40, 1, generator=generator)
    for k in (1, 3):
        actual = knn.knn_score(queries, bank, k).double()
        expected = _brute_force_stored(queries, bank, k)
        if k == 1:  # the regime this is about: the nearest row ~1e-10 away
            assert (expected > -1e-7).all() and (expected < 0).all()
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)


def _brute_force_stored(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """−(k-th smallest ‖q̂ − b‖²) in float64 from the normalised float32 queries and the stored bank."""
    q = knn.normalise_rows(queries).double()
    distances = (q[:, None, :] - bank.double()[None, :, :]).square().sum(2)
    return -distances.sort(dim=1).values[:, k - 1]


def test_near_ties_beyond_the_candidates_are_selected_again_in_float64(monkeypatch):
    """Many bank rows within the GEMM's rounding of each other: the 2k candidates cannot
    prove they hold the k nearest, so those queries are selected again in float64; the
    k-th distance still equals the float64 brute force."""
    generator = torch.Generator().manual_seed(1)
    centre = knn.normalise_rows(torch.randn(1, 64, generator=generator))
    bank = knn.normalise_rows(centre + 1e-4 * torch.randn(200, 64, generator=generator))
    bank = torch.cat([bank, knn.normalise_rows(torch.randn(100, 64, generator=generator))])
    queries = centre + 1e-6 * torch.randn(5, 64, generator=generator)
    calls = []
    nearest = knn._nearest
    monkeypatch.setattr(knn, "_nearest", lambda q, *a: calls.append(q.dtype) or nearest(q, *a))
    actual = knn.knn_score(queries, bank, 4).double()
    assert calls == [torch.float32, torch.float64]
    torch.testing.assert_close(actual, _brute_force_stored(queries, bank, 4), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_distances_below_the_float64_gemm_rounding_are_exact(dtype, seed):
    """299 bank rows one ulp from the query in one coordinate, the nearest one ulp off in its
    smallest coordinate (a distance of ~1e-17): the float64 GEMM cannot order them either
    (3-250x off, an exact duplicate missed), so such queries are scanned from the differences."""
    torch.manual_seed(seed)
    query = knn.normalise_rows(torch.randn(1, 8, dtype=dtype))
    normalised = knn.normalise_rows(query)
    smallest = int(normalised.abs().argmin())
    bank = normalised.repeat(300, 1)
    up = torch.tensor(2.0, dtype=dtype)
    for row in range(299):
        column = row % 8 if row % 8 != smallest else (row + 1) % 8
        bank[row, column] = torch.nextafter(bank[row, column], up)
    bank[-1, smallest] = torch.nextafter(bank[-1, smallest], up)
    duplicate = torch.cat([bank[:-1], normalised])  # and an exact copy of the query as the nearest
    for rows in (bank, duplicate):
        for k in (1, 2):
            torch.testing.assert_close(knn.knn_score(query, rows, k).double(), _brute_force_stored(query, rows, k),
                                       rtol=1e-6, atol=0)
