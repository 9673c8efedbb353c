"""nn.Embedding: repeated ids within a sample add up; padding_idx gets no gradient;
with scale_grad_by_freq each id's gradient is divided by its count in the sample
(the sample's own gradient: autograd divides by the count in the batch it is given).

A sample's gradient is non-zero only in the rows of the ids it holds, so both
rules work on (sample, id) pairs and never on a one-hot over the vocabulary."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from gradood.persample._grads import LayerGradients, register_grad_rule
from gradood.persample._rules import RuleResult, register_rule


@register_rule(nn.Embedding)
def embedding_rule(module: nn.Embedding, inputs: torch.Tensor, grad_output: torch.Tensor) -> RuleResult:
    """s_i = Σ_v ‖Σ_{t: id_t = v} g_t‖² over the ids v of sample i (v ≠ padding_idx):
    a segment sum over (sample, id) pairs, never a one-hot over the vocabulary."""
    samples, _, rows = _sample_id_rows(module, inputs, grad_output)
    squared = rows.new_zeros(inputs.shape[0]).index_add_(0, samples, rows.square().sum(1))
    return RuleResult({"weight": squared}, "direct")


def id_counts(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """[B, T]: how often each position's id occurs in its sample (ids [B, T])."""
    sample = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
    _, slot, counts = torch.unique(sample * module.num_embeddings + ids, return_inverse=True, return_counts=True)
    return counts[slot]


def _sample_id_rows(module: nn.Embedding, inputs: torch.Tensor, grad_output: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The non-zero rows of the per-sample gradients: for each distinct (sample i, id v)
    with v ≠ padding_idx, (i, v, Σ_{t: id_t = v} g_t), divided by that count under
    scale_grad_by_freq."""
    batch = inputs.shape[0]
    ids = inputs.reshape(batch, -1)
    grads = grad_output.reshape(batch, ids.shape[1], -1)
    if module.scale_grad_by_freq:
        grads = grads / id_counts(module, ids).unsqueeze(-1).to(grads.dtype)
    sample = torch.arange(batch, device=ids.device).unsqueeze(1).expand_as(ids)
    keep = torch.ones_like(ids, dtype=torch.bool) if module.padding_idx is None else ids != module.padding_idx
    keys = (sample * module.num_embeddings + ids)[keep]
    unique_keys, slot = torch.unique(keys, return_inverse=True)
    rows = grads.new_zeros(unique_keys.shape[0], grads.shape[2]).index_add_(0, slot, grads[keep])
    return unique_keys // module.num_embeddings, unique_keys % module.num_embeddings, rows


class EmbeddingGradients(LayerGradients):
    """Reductions over the sparse per-sample gradients: gathers and index_adds
    over the (sample, id) rows; dense [L or 1, num_embeddings·dim] results."""

    def __init__(self, module: nn.Embedding, inputs: torch.Tensor, grad_output: torch.Tensor, key: str = "weight"):
        self.count, self.key = inputs.shape[0], key
        self.numels = {key: module.weight.numel()}
        self.shape = tuple(module.weight.shape)
        self.samples, self.ids, self.rows = _sample_id_rows(module, inputs, grad_output)

    def project(self, directions):
        table = directions[self.key].reshape(-1, *self.shape)  # [K, V, dim]
        out = self.rows.new_zeros(self.count, table.shape[0])
        step = max(1, (1 << 24) // max(1, table.shape[0] * self.shape[1]))
        for start in range(0, self.ids.shape[0], step):
            ids, rows = self.ids[start : start + step], self.rows[start : start + step]
            gathered = table[:, ids].to(rows.dtype)  # [K, u, dim]
            out.index_add_(0, self.samples[start : start + step], torch.einsum("kud,ud->uk", gathered, rows))
        return out

    def weighted_sum(self, weights):
        weights = weights.to(self.rows.dtype)
        out = self.rows.new_zeros(weights.shape[1], *self.shape)
        for column in range(weights.shape[1]):
            out[column].index_add_(0, self.ids, weights[self.samples, column, None] * self.rows)
        return {self.key: out.reshape(weights.shape[1], -1)}

    def moments(self):
        # Samples without an id contribute a zero gradient to that row:
        # Σ_i (G_i − m)² = Σ_{present} (row − m)² + (n − present) m².
        total = self.rows.new_zeros(self.shape).index_add_(0, self.ids, self.rows)
        mean = total / self.count
        present = self.rows.new_zeros(self.shape[0]).index_add_(
            0, self.ids, torch.ones_like(self.ids, dtype=self.rows.dtype)
        )
        squares = self.rows.new_zeros(self.shape).index_add_(0, self.ids, (self.rows - mean[self.ids]).square())
        squares += (self.count - present)[:, None] * mean.square()
        return {self.key: (mean.reshape(-1), squares.reshape(-1))}


@register_grad_rule(nn.Embedding)
def embedding_grads(module: nn.Embedding, inputs: torch.Tensor, grad_output: torch.Tensor) -> EmbeddingGradients:
    return EmbeddingGradients(module, inputs, grad_output)
