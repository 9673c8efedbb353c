"""Exact k-nearest-neighbour OOD scores (Sun et al. 2022, as used by the
low-dimensional-gradient method): queries and the ID bank are L2-normalised
(x / (‖x‖ + 1e-10), as the official code); the score of a query is minus its
squared L2 distance to the k-th nearest bank row (faiss IndexFlatL2's
distance), or, with metric="cosine", the k-th largest cosine similarity (the
same ranking for non-zero vectors: ‖q̂ − b̂‖² = 2 − 2 cos). ID-high.

Exact and batched: the bank is scanned in blocks with a running top-k, so
memory is B × (block + k), on whatever device the tensors are on.
"""

from __future__ import annotations

import torch

METRICS = ("squared_l2", "cosine")

# Query × bank elements per block of distances (≈64 MB in float32).
_BLOCK_ELEMENTS = 1 << 24


def normalise_rows(rows: torch.Tensor) -> torch.Tensor:
    """rows / (‖row‖₂ + 1e-10) (zero rows stay zero)."""
    return rows / (torch.linalg.vector_norm(rows, dim=1, keepdim=True) + 1e-10)


def knn_score(queries: torch.Tensor, bank: torch.Tensor, k: int = 5, metric: str = "squared_l2") -> torch.Tensor:
    """ID-scores [B] of queries [B, K] against an already normalised bank [N, K]
    (normalise_rows). Queries are normalised here. Computed in float32 or better."""
    where = "gradood.knn_score"
    if metric not in METRICS:
        raise ValueError(f"{where}: metric must be one of {METRICS}, got {metric!r}")
    if queries.dim() != 2 or bank.dim() != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"{where}: queries [B, K] and bank [N, K] must share K, got {tuple(queries.shape)} and {tuple(bank.shape)}"
        )
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= bank.shape[0]:
        raise ValueError(f"{where}: k must be an integer in [1, {bank.shape[0]}] (the bank size), got {k!r}")
    if queries.device != bank.device:
        raise ValueError(f"{where}: queries on {queries.device} and bank on {bank.device}")
    dtype = torch.float64 if torch.float64 in (queries.dtype, bank.dtype) else torch.float32
    q = normalise_rows(queries.to(dtype))
    q_sq = q.square().sum(1, keepdim=True)
    best: torch.Tensor | None = None
    block = max(k, _BLOCK_ELEMENTS // max(1, q.shape[0]))
    for start in range(0, bank.shape[0], block):
        b = bank[start : start + block].to(dtype)
        if metric == "cosine":  # minimise −cos
            values = torch.mm(q, b.T).neg_()
        else:  # ‖q‖² + ‖b‖² − 2 q·b in one GEMM with accumulation, clamped in place
            values = torch.addmm(q_sq + b.square().sum(1)[None, :], q, b.T, alpha=-2).clamp_min_(0)
        if best is not None:
            values = torch.cat([best, values], 1)
        best = values.topk(min(k, values.shape[1]), dim=1, largest=False).values
    if best is None:  # pragma: no cover - k ≥ 1 needs a non-empty bank
        raise ValueError("gradood.knn_score: the bank is empty")
    return -best[:, k - 1]
