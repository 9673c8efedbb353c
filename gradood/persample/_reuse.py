"""Layers called more than once in one forward (ALBERT's shared transformer layer,
a weight-tied or recurrent block): a sample's gradient is the sum over the calls,
so its squared norm is ‖Σ_u G_u‖² = Σ_{u,v} ⟨G_u, G_v⟩, not Σ_u ‖G_u‖².

The recorder keeps each call as its own piece ("piece@u" for the u-th call after
the first). For Linear and Embedding the calls are one longer sequence: the
per-sample gradient Σ_u Σ_t g_t a_tᵀ is that of the calls' positions
concatenated, so the layer's own rule (ghost or materialise) gives the exact norm
with the cross terms. Any other layer sums its calls' per-sample gradients from
its gradient rule in bounded chunks of samples, then squares.
"""

from __future__ import annotations

import typing
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from gradood.persample._grads import DenseLayerGradients, LayerGradients
from gradood.persample.embedding import id_counts

Pieces = Dict[Optional[str], tuple]

_CONCATENATED = (nn.Linear, nn.Embedding)


def use_key(piece: Optional[str], use: int) -> Optional[str]:
    """The recorder's piece name of the use-th call (0: the first) of a layer's piece."""
    return piece if use == 0 else f"{piece or ''}@{use}"


def base_piece(key: Optional[str]) -> Optional[str]:
    if key is None or "@" not in key:
        return key
    base = key.rsplit("@", 1)[0]
    return base or None


def calls(pieces: Pieces) -> List[Pieces]:
    """The pieces of each call, in call order, keyed by their base names."""
    by_use: Dict[int, Pieces] = {}
    for key, pair in pieces.items():
        use = int(key.rsplit("@", 1)[1]) if key is not None and "@" in key else 0
        by_use.setdefault(use, {})[base_piece(key)] = pair
    return [by_use[use] for use in sorted(by_use)]


def is_reused(pieces: Pieces) -> bool:
    return any(key is not None and "@" in key for key in pieces)


def concatenated(module: nn.Module, pieces: Pieces) -> Optional[Pieces]:
    """For a Linear or Embedding (exact class) called several times: one piece whose
    positions are all calls' positions; None for other layers."""
    if type(module) not in _CONCATENATED:
        return None
    uses = calls(pieces)
    batch = uses[0][None][0].shape[0]
    grads = [use[None][1].reshape(batch, -1, use[None][1].shape[-1]) for use in uses]
    if isinstance(module, nn.Linear):
        inputs = torch.cat([use[None][0].reshape(batch, -1, use[None][0].shape[-1]) for use in uses], 1)
    else:
        ids = [use[None][0].reshape(batch, -1) for use in uses]
        inputs = torch.cat(ids, 1)
        if module.scale_grad_by_freq:  # each call divides by its own counts; the rule will divide by all calls' counts
            embedding = typing.cast(nn.Embedding, module)  # the rules reused here: Linear and Embedding
            every = id_counts(embedding, inputs).split([part.shape[1] for part in ids], 1)
            grads = [
                grad * (total.to(grad.dtype) / id_counts(embedding, part).to(grad.dtype)).unsqueeze(-1)
                for grad, total, part in zip(grads, every, ids)
            ]
    return {None: (inputs, torch.cat(grads, 1))}


def summed_gradients(per_call: List[LayerGradients]) -> DenseLayerGradients:
    """The per-sample gradients of all calls added up, materialised chunk by chunk."""
    dense = [grads for grads in per_call if isinstance(grads, DenseLayerGradients)]
    if len(dense) != len(per_call):
        raise NotImplementedError("summing per-call gradients needs dense gradient rules")
    first = dense[0]

    def materialise(start: int, end: int):
        total: Dict[str, torch.Tensor] = {}
        for grads in dense:
            for name, value in grads._materialise(start, end).items():
                total[name] = value if name not in total else total[name] + value
        return total

    return DenseLayerGradients(first.count, first.numels, materialise, max(grads._per_sample_cost for grads in dense))


def squared_norms(gradients: DenseLayerGradients) -> Dict[str, torch.Tensor]:
    """Per-sample squared norms [B] of each parameter's (summed) gradient."""
    out: Dict[str, List[torch.Tensor]] = {}
    for _, _, chunk in gradients.chunks():
        for name, value in chunk.items():
            out.setdefault(name, []).append(value.square().sum(1))
    return {name: torch.cat(parts) for name, parts in out.items()}


def reused_gradients(pieces: Pieces, per_call: Callable[[Pieces], LayerGradients]) -> DenseLayerGradients:
    return summed_gradients([per_call(use) for use in calls(pieces)])
