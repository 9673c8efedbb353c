"""The recorder of the engine's pass: each hooked layer's input until the backward
produces the gradient w.r.t. its output, then the layer is handed to `consume`
— during the backward, so the output gradients of all layers never exist at
once. The module hooks that feed it are here too."""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from gradood.persample._hooks import on_gradient
from gradood.persample._layout import layer_input as layer_input_of
from gradood.persample._reuse import use_key


class PieceRecord:
    """One piece's input, the input's version counter when recorded, the output's
    shape, dtype and device (for a zero gradient where the loss does not depend on
    it), and its output gradient once the backward has produced it."""

    __slots__ = ("input", "version", "output_like", "grad", "batch_dim", "fold")

    def __init__(self, layer_input: torch.Tensor, output: torch.Tensor, batch_dim: int, fold: int = 1):
        self.batch_dim = batch_dim  # of the input and the output (features-last layers), moved to the front
        self.fold = fold  # k > 1: dimension 0 holds k rows per sample (a folded batch), unfolded to [B, k, ...]
        self.input, self.version = self.per_sample(layer_input.detach()), layer_input._version
        self.output_like: Dict[str, Any] = dict(size=output.shape, dtype=output.dtype, device=output.device)
        self.grad: Optional[torch.Tensor] = None

    def per_sample(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.fold > 1:
            return tensor.reshape(tensor.shape[0] // self.fold, self.fold, *tensor.shape[1:])
        return tensor.movedim(self.batch_dim, 0)


class Recorder:
    """Keeps, per (layer, piece), the piece's input (and its version counter) until
    the backward has produced the gradient of the loss w.r.t. the piece's output.
    As soon as every piece of a layer has its gradient, the layer is handed to
    `consume` — during the backward — and its records are dropped: a layer's input
    and output gradient live no longer than the backward needs them, and the output
    gradients of all layers never exist at once.

    A piece's output that requires grad is returned as is, with a tensor hook: a
    hook registered before an in-place op downstream (ReLU(inplace=True)) receives
    the gradient w.r.t. the value before that op, so no copy is needed. An output
    that does not require grad (the first parametrised layer, its parameters being
    frozen) becomes a leaf that autograd.grad differentiates against, and the graph
    continues from a copy of it (an in-place op on a leaf that requires grad is an
    error)."""

    def __init__(
        self,
        where: str,
        consume: Callable[[str, Dict[Optional[str], tuple]], object],
        deferred: Iterable[str],
        batch: int,
        batch_dims: Dict[Tuple[str, Optional[str]], int],
        broadcast: Iterable = (),
        folds: Optional[Dict[Tuple[str, Optional[str]], int]] = None,
    ):
        self.where = where
        self.batch, self.batch_dims, self.folds = batch, batch_dims, folds or {}
        self.broadcast = set(broadcast)  # (layer, piece) whose input has a leading 1 shared by the batch
        self.consume = consume
        self.deferred = set(deferred)  # layers consumed only after the pass (they replay their module)
        self.layers: Dict[str, Dict[Optional[str], PieceRecord]] = {}  # layers not consumed yet, by piece
        self.leaves: List[Tuple[Tuple[str, Optional[str]], torch.Tensor]] = []
        self.results: Dict[str, object] = {}
        self.backward_started = False

    def record(
        self,
        key: Tuple[str, Optional[str]],
        layer_input: torch.Tensor,
        output: torch.Tensor,
        batch_dim: Optional[int] = None,
        fold: Optional[int] = None,
    ) -> torch.Tensor:
        layer, piece = key
        pieces = self.layers.setdefault(layer, {})
        if layer in self.results:
            raise RuntimeError(f"{self.where}: {layer} was called again after its gradient was consumed")
        if batch_dim is None:
            batch_dim = self.batch_dims.get(key, 0)
        if fold is None:
            fold = self.folds.get(key, 1)
        if key in self.broadcast:  # a leading 1 shared by the batch: each sample gets its own copy
            layer_input = layer_input.expand(self.batch, *layer_input.shape[1:])
            output = output.expand(self.batch, *output.shape[1:])
        use = 0
        while use_key(piece, use) in pieces:  # a layer called again: its own piece (gradood/persample/_reuse.py)
            use += 1
        key = (layer, use_key(piece, use))
        piece = key[1]
        if layer_input.dim() <= batch_dim or layer_input.shape[batch_dim] != self.batch * fold:
            raise ValueError(
                f"{self.where}: {layer} was called on a tensor of shape {tuple(layer_input.shape)}, whose dimension "
                f"{batch_dim} is not the batch of {self.batch}: its rows are not the samples"
            )
        pieces[piece] = PieceRecord(layer_input, output, batch_dim, fold)
        if not output.requires_grad:  # the start of the chain we differentiate
            leaf = output.detach().requires_grad_()
            self.leaves.append((key, leaf))
            return leaf.clone()
        return on_gradient(output, functools.partial(self._on_grad, key))  # a copy where it is a view (_hooks.py)

    def _on_grad(self, key: Tuple[str, Optional[str]], grad: torch.Tensor) -> None:
        if self.backward_started:  # not a backward of the user's own, inside the forward
            self.give(key, grad)

    def give(self, key: Tuple[str, Optional[str]], grad: Optional[torch.Tensor]) -> None:
        """The gradient w.r.t. this piece's output (None: the loss does not depend on it)."""
        layer, piece = key
        pieces = self.layers.get(layer)
        if pieces is None or pieces[piece].grad is not None:  # consumed already
            return
        record = pieces[piece]
        record.grad = record.per_sample(torch.zeros(**record.output_like) if grad is None else grad)
        if layer not in self.deferred and all(record.grad is not None for record in pieces.values()):
            self.finish(layer)

    def finish(self, layer: str) -> None:
        """Hands the layer's (input, output gradient) per piece to `consume`."""
        pieces = self.layers.pop(layer)
        for record in pieces.values():
            if record.input._version != record.version:
                raise RuntimeError(
                    f"{self.where}: the input of {layer} was modified in place after the layer ran; "
                    "its per-sample gradient cannot be computed"
                )
        self.results[layer] = self.consume(layer, {piece: (r.input, r.grad) for piece, r in pieces.items()})

    def finish_rest(self) -> None:
        """After the backward: pieces it never reached get zero gradients; every
        layer not consumed yet (deferred ones included) is consumed."""
        for layer in list(self.layers):
            for piece in list(self.layers[layer]):
                self.give((layer, piece), None)
            if layer in self.layers:
                self.finish(layer)


def record_output(recorder: Recorder, name: str, module: nn.Module, args: tuple, kwargs: dict, output) -> torch.Tensor:
    layer_input = layer_input_of(args, kwargs)
    if layer_input is None or not isinstance(output, torch.Tensor):
        raise ValueError(
            f"{recorder.where}: {name or 'the model'} ({type(module).__name__}) was called without a tensor "
            "input or did not return a tensor; its rule needs both"
        )
    return recorder.record((name, None), layer_input, output)


def record_single_input(recorder: Recorder, name: str, module: nn.Module, args: tuple, kwargs: dict, output):
    if len(args) != 1 or not isinstance(args[0], torch.Tensor) or kwargs or not isinstance(output, torch.Tensor):
        raise ValueError(
            f"{recorder.where}: fallback='torch.func' needs {name or 'the model'} ({type(module).__name__}) to take one "
            f"tensor and return one, got {len(args)} positional and {len(kwargs)} keyword inputs"
        )
    return recorder.record((name, None), args[0], output)


def record_piece(
    recorder: Recorder, name: str, piece: str, layer_input: torch.Tensor, output: torch.Tensor
) -> torch.Tensor:
    return recorder.record((name, piece), layer_input, output)
