"""Exact k-nearest-neighbour OOD scores (Sun et al. 2022, as used by the
low-dimensional-gradient method): queries and the ID bank are L2-normalised
(x / (‖x‖ + 1e-10), as the official code); the score of a query is minus its
squared L2 distance to the k-th nearest bank row (faiss IndexFlatL2's
distance), or, with metric="cosine", the k-th largest cosine similarity (the
same ranking for non-zero vectors: ‖q̂ − b̂‖² = 2 − 2 cos). ID-high.

Exact and batched: the bank is scanned in blocks with a running top-k, so
memory is B × (block + k), on whatever device the tensors are on.

Squared L2 distances from one GEMM, ‖q‖² + ‖b‖² − 2 q·b, lose everything to cancellation
for near neighbours (a float32 distance of 1e-8 comes out as 0 or 1e-7). So the GEMM only
selects candidates, the max(2k, k + 32) nearest by it, and their distances are recomputed from the
differences, (q − b)², in float64. The result is exact whenever the GEMM's rounding bound δ
(every distance it gives is within δ of the true one) cannot have left a nearer row out: the
last candidate's GEMM distance minus δ is at least the refined k-th; queries where it is not
(ties or near-ties among more rows than the candidates) are selected again by a float64 GEMM, and those it cannot
clear either (distances below its rounding, ~1e-15) are scanned over the whole bank from the
differences.
"""

from __future__ import annotations

import torch

METRICS = ("squared_l2", "cosine")

# Query × bank elements per block of distances (≈64 MB in float32), and query × candidate ×
# dimension elements per block of refined distances.
_BLOCK_ELEMENTS = 1 << 24


def normalise_rows(rows: torch.Tensor) -> torch.Tensor:
    """rows / (‖row‖₂ + 1e-10) (zero rows stay zero)."""
    return rows / (torch.linalg.vector_norm(rows, dim=1, keepdim=True) + 1e-10)


def knn_score(queries: torch.Tensor, bank: torch.Tensor, k: int = 5, metric: str = "squared_l2") -> torch.Tensor:
    """ID-scores [B] of queries [B, K] against an already normalised bank [N, K]
    (normalise_rows). Queries are normalised here. Computed in float32 or better;
    squared-L2 distances of the selected neighbours in float64 (see the module notes)."""
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
    if metric == "cosine":  # minimise −cos: no cancellation, the GEMM's values are the scores
        values, _, _ = _nearest(q, bank, k, metric)
        return -values[:, k - 1]
    return -kth_squared_distance(q, bank, k)


def largest_inner_products(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest q · b of each query over the bank rows, descending [B, k], by blocked GEMMs
    with a running top-k (a sum of products: no cancellation to refine)."""
    values, _, _ = _nearest(queries, bank, k, "inner_product")
    return values


def kth_squared_distance(q: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest ‖q − b‖² of each query over the bank rows [B], exact (see the module
    notes), in q's dtype (float32 or float64). The rounding bound that decides which queries need
    a second look scales with the larger of ‖q‖² and the bank's largest ‖b‖² (1 for normalised
    rows; ~1e-4 for GrOOD's gradients, whose distances are as small)."""
    dtype = q.dtype
    # Candidates: 2k, at least k + 32 (for small k the k-th and 2k-th distances of a large bank
    # are often within the GEMM's rounding, which sent every query to the float64 GEMM).
    count = min(max(2 * k, k + 32), bank.shape[0])
    values, indices, bank_squares = _nearest(q, bank, count, "squared_l2")
    refined = _refined_distances(q, bank, indices)
    kth = refined.sort(dim=1).values[:, k - 1]
    if count < bank.shape[0]:
        # A row left out has a GEMM distance >= the count-th, so a true one >= that - δ, δ scaled
        # by the larger of ‖q‖² and the bank's largest ‖b‖² (every rounding term is below it).
        largest = bank_squares * 1.01  # 1% for their own rounding
        scale = torch.linalg.vector_norm(q, dim=1).double().square().mul_(1.01).clamp_min_(largest).to(kth.device)
        rows = (values[:, count - 1] - _rounding_bound(q, dtype) * scale < kth).nonzero().squeeze(1)
        if dtype == torch.float32 and rows.numel():  # selected again by a float64 GEMM
            q64 = q[rows].double()
            again, again_indices, _ = _nearest(q64, bank, count, "squared_l2")
            kth[rows] = _refined_distances(q64, bank, again_indices).sort(dim=1).values[:, k - 1]
            rows = rows[again[:, count - 1] - _rounding_bound(q64, torch.float64) * scale[rows] < kth[rows]]
        if rows.numel():  # distances below float64's GEMM rounding (near duplicates): every row
            kth[rows] = _direct_kth(q[rows], bank, k)
    return kth.to(dtype)


def _direct_kth(q: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest ‖q − b‖² over the whole bank from the differences, in float64 [B]."""
    q = q.double()
    block = max(k, _BLOCK_ELEMENTS // max(1, q.shape[0] * q.shape[1]))
    best = None
    for start in range(0, bank.shape[0], block):
        distances = (q[:, None, :] - bank[start : start + block].double()[None, :, :]).square().sum(2)
        values = distances if best is None else torch.cat([best, distances], 1)
        best = values.topk(min(k, values.shape[1]), dim=1, largest=False).values
    assert best is not None
    return best[:, k - 1]


def _rounding_bound(q: torch.Tensor, dtype: torch.dtype) -> float:
    """δ: |GEMM distance − true distance| <= δ for rows of norm ≤ 1 (times max(‖q‖², ‖b‖²) else): γ_K = K u / (1 − K u) for each
    of ‖q‖², ‖b‖² and q·b (counted twice), plus the roundings of the sum, with a factor 2
    to spare. u is the unit roundoff of the GEMM: float32's, or TF32's / bfloat16's where
    torch.set_float32_matmul_precision allows them."""
    unit = torch.finfo(dtype).eps / 2
    if dtype == torch.float32:
        unit = {"highest": unit, "high": 2.0**-11, "medium": 2.0**-8}.get(torch.get_float32_matmul_precision(), 2.0**-8)
    dims = q.shape[1]
    gamma = dims * unit / max(1e-3, 1 - dims * unit)
    return float(2 * (4 * gamma + 12 * unit))


def _nearest(q: torch.Tensor, bank: torch.Tensor, count: int, metric: str):
    """The `count` smallest GEMM distances (−cos for "cosine") of each query, ascending, or
    for "inner_product" the `count` largest q · b, descending; their bank rows ([B, count] each);
    and, for "squared_l2", the largest ‖b‖² of the bank (0.0 otherwise), from the norms the
    distances need anyway."""
    dtype = q.dtype
    largest = metric == "inner_product"
    q_sq = q.square().sum(1, keepdim=True)
    best = best_indices = None
    bank_squares = torch.zeros((), dtype=dtype, device=q.device)
    block = max(count, _BLOCK_ELEMENTS // max(1, q.shape[0]))
    for start in range(0, bank.shape[0], block):
        b = bank[start : start + block].to(dtype)
        if largest:
            values = torch.mm(q, b.T)
        elif metric == "cosine":
            values = torch.mm(q, b.T).neg_()
        else:  # ‖q‖² + ‖b‖² − 2 q·b in one GEMM with accumulation, clamped in place
            b_sq = torch.linalg.vector_norm(b, dim=1).square_()  # no B-sized temporary, as b.square() was
            bank_squares = torch.maximum(bank_squares, b_sq.max())
            values = torch.addmm(q_sq + b_sq[None, :], q, b.T, alpha=-2).clamp_min_(0)
        kept = 0 if best is None else best.shape[1]
        if best is not None:
            values = torch.cat([best, values], 1)
        best, chosen = values.topk(min(count, values.shape[1]), dim=1, largest=largest)
        # chosen < kept: a row of the running best; otherwise one of this block's.
        from_block = chosen - kept + start
        best_indices = (
            from_block
            if best_indices is None
            else torch.where(chosen >= kept, from_block, best_indices.gather(1, chosen.clamp_max(kept - 1)))
        )
    if best is None or best_indices is None:  # pragma: no cover - k ≥ 1 needs a non-empty bank
        raise ValueError("gradood.knn_score: the bank is empty")
    return best, best_indices, float(bank_squares)


def _refined_distances(q: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """‖q − b‖² in float64 from the differences, for each query's candidate rows [B, m]."""
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(1, indices.shape[1] * q.shape[1]))
    out = []
    for start in range(0, q.shape[0], rows_per_block):
        candidates = bank[indices[start : start + rows_per_block]].double()  # [b, m, K]
        out.append((q[start : start + rows_per_block, None, :].double() - candidates).square().sum(2))
    return torch.cat(out) if out else q.new_zeros(0, indices.shape[1], dtype=torch.float64)
