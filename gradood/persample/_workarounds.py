"""A PyTorch bug the engine's backward passes step around.

torch 2.13's CPU backward of batch_norm in eval mode returns wrong gradients —
for the input, the weight and the bias — at batch size 1 when the output
gradient is strided channels-last while the input is contiguous (a [1, C, H, W]
gradient that arrives through `x.flatten(2).transpose(1, 2)`, as in timm's
EfficientFormer: off by tens of percent). Plain autograd on one sample is then
wrong too — a per-sample loop, the single-sample check, a server scoring one
request. For
the engine's forwards (the pass, the single-sample check, ODIN's input gradient)
every BatchNorm module's output gets a tensor hook that hands its backward a
contiguous gradient when its input is contiguous, which the kernel handles
correctly; the values are unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def _contiguous_gradient(module: nn.Module, args: tuple, output) -> None:
    if not isinstance(output, torch.Tensor) or not output.requires_grad or not args:
        return
    if isinstance(args[0], torch.Tensor) and args[0].is_contiguous():
        output.register_hook(lambda grad: None if grad.is_contiguous() else grad.contiguous())


@contextlib.contextmanager
def batch_norm_gradient_layout(model: nn.Module) -> Iterator[None]:
    handles = [
        module.register_forward_hook(_contiguous_gradient)
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
