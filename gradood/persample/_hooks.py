"""Output-gradient hooks that survive in-place ops downstream.

A tensor hook registered before an in-place op on the tensor receives the gradient
w.r.t. the value before that op (ReLU(inplace=True), `out += identity`) — unless the
tensor is a view: the in-place op then rebases the view's autograd history and the
hook is dropped without a call. Layer outputs are often views (F.linear on a 3-D
input with a frozen weight returns a reshaped matmul), and models modify them in
place (RoCBERT's `embedding_in += token_type_embeddings` after its input Linear), so
a view is replaced by a copy that holds the hook. The copy costs one pass over the
output, only for outputs that are views.
"""

from __future__ import annotations

from typing import Callable

import torch


def on_gradient(tensor: torch.Tensor, hook: Callable[[torch.Tensor], object]) -> torch.Tensor:
    """Registers `hook` for the gradient w.r.t. `tensor`'s current value; returns the
    tensor the graph must continue from (a copy where `tensor` is a view)."""
    if tensor._base is not None:
        tensor = tensor.clone()
    tensor.register_hook(hook)
    return tensor
