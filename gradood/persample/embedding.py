"""nn.Embedding: repeated ids within a sample add up; padding_idx gets no gradient."""

from __future__ import annotations

import torch
from torch import nn

from gradood.persample._rules import RuleResult, register_rule


@register_rule(nn.Embedding)
def embedding_rule(module: nn.Embedding, inputs: torch.Tensor, grad_output: torch.Tensor) -> RuleResult:
    """s_i = Σ_v ‖Σ_{t: id_t = v} g_t‖² over the ids v of sample i (v ≠ padding_idx):
    a segment sum over (sample, id) pairs, never a one-hot over the vocabulary."""
    batch = inputs.shape[0]
    ids = inputs.reshape(batch, -1)
    grads = grad_output.reshape(batch, ids.shape[1], -1)
    sample = torch.arange(batch, device=ids.device).unsqueeze(1).expand_as(ids)
    keep = torch.ones_like(ids, dtype=torch.bool) if module.padding_idx is None else ids != module.padding_idx
    keys = (sample * module.num_embeddings + ids)[keep]
    unique_keys, slot = torch.unique(keys, return_inverse=True)
    summed = grads.new_zeros(unique_keys.shape[0], grads.shape[2]).index_add_(0, slot, grads[keep])
    squared = grads.new_zeros(batch).index_add_(0, unique_keys // module.num_embeddings, summed.square().sum(1))
    return RuleResult({"weight": squared}, "direct")
