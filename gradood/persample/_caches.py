"""Tensor caches in modules, emptied for the engine's forwards.

Some models keep a tensor computed from a parameter in a dict attribute and
reuse it in later forwards (timm's and Hugging Face's LeViT, EfficientFormer and
EfficientViT fill `attention_bias_cache` in eval mode). A cached tensor hides the
parameter from that forward: its gradient would be lost, or flow through a graph
already freed. For each of the engine's forwards (the layout probes, the pass,
the single-sample check) every public dict attribute of a module that is empty
or holds only tensors is replaced by an empty dict of its type, and the original
object is put back afterwards, unchanged: the user's model keeps its cache.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
from torch import nn


def _is_tensor_cache(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(item, torch.Tensor) for item in value.values())


@contextlib.contextmanager
def empty_tensor_caches(model: nn.Module) -> Iterator[None]:
    saved: List[Tuple[nn.Module, str, dict]] = []
    try:
        for module in model.modules():
            for key, value in list(vars(module).items()):
                if not key.startswith("_") and _is_tensor_cache(value):
                    saved.append((module, key, value))
                    module.__dict__[key] = type(value)()
        yield
    finally:
        for module, key, value in saved:
            module.__dict__[key] = value
