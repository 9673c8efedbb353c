"""The per-sample gradients of direct parameters (gradood/persample/_direct.py),
accumulated from the per-sample cotangents of their meetings.

A cotangent of a derived operand D reaches the parameters by the VJP of D's
derivation, batched over samples (torch.autograd.grad with is_grads_batched),
in chunks of samples; a cotangent of a parameter itself needs none. A parameter
with a single contribution (one meeting, one operand: the common case) gets its
squared norms chunk by chunk without its per-sample gradients ever being held
for the whole batch; others sum them in a dense [B, numel] buffer first.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch

from gradood.persample._direct import METHODS, Source, Step
from gradood.persample._grads import DenseLayerGradients, outer_product_sums
from gradood.persample._hooks import on_gradient

# Elements a chunk of per-sample parameter gradients may hold.
_CHUNK_ELEMENTS = 1 << 26


def contributions(steps: Sequence[Step]) -> Dict[str, int]:
    """How many per-sample gradient terms each direct parameter gets in a pass."""
    counts: Dict[str, int] = {}
    for step in steps:
        if not step.meeting:
            continue
        for kind, sources in zip(step.kinds, step.sources):
            if kind in ("param", "derived"):
                for name in sources:
                    counts[name] = counts.get(name, 0) + 1
    return counts


class DirectGradients:
    """Accumulates the per-sample gradients [B, numel] (or, with squared_only, the
    squared norms [B] of single-contribution parameters) of the direct parameters."""

    def __init__(
        self, sources: Sequence[Source], batch: int, counts: Dict[str, int], squared_only: bool, dtype: torch.dtype
    ):
        self.batch, self.counts, self.dtype = batch, counts, dtype
        self.proxies: Dict[str, torch.Tensor] = {s.name: s.parameter.detach().requires_grad_() for s in sources}
        self.numels = {s.name: s.parameter.numel() for s in sources}
        self.single = {name for name in self.proxies if squared_only and counts.get(name, 0) == 1}
        device = next(iter(self.proxies.values())).device if self.proxies else None
        self.squared = {name: torch.zeros(batch, dtype=dtype, device=device) for name in self.single}
        self.dense: Dict[str, torch.Tensor] = {}
        self.methods: Dict[str, str] = {}

    def _add(self, name: str, start: int, grads: torch.Tensor) -> None:
        grads = grads.reshape(grads.shape[0], -1).to(self.dtype)
        end = start + grads.shape[0]
        if name in self.single:
            self.squared[name][start:end] += grads.square().sum(1)
            return
        if name not in self.dense:
            self.dense[name] = grads.new_zeros(self.batch, self.numels[name])
        self.dense[name][start:end] += grads

    def sink(self, operand: torch.Tensor, per_sample: torch.Tensor, sources: frozenset, method: str) -> None:
        """A meeting's per-sample cotangent [B, *operand.shape] of a derived operand,
        found by `method` (gradood.persample._direct.METHODS)."""
        names = sorted(sources)
        proxies = [self.proxies[name] for name in names]
        for name in names:
            known = self.methods.get(name)
            if known not in METHODS or METHODS.index(method) > METHODS.index(known):
                self.methods[name] = method
        if len(proxies) == 1 and operand is proxies[0]:
            self._add(names[0], 0, per_sample)
            return
        width = sum(self.numels[name] for name in names) + operand.numel()
        step = max(1, _CHUNK_ELEMENTS // max(1, width))
        for start in range(0, per_sample.shape[0], step):
            chunk = per_sample[start : start + step].to(operand.dtype)
            for name, grad in zip(names, self._derivation_vjp(operand, proxies, chunk)):
                if grad is not None:
                    self._add(name, start, grad)

    @staticmethod
    def _derivation_vjp(operand: torch.Tensor, proxies: List[torch.Tensor], chunk: torch.Tensor):
        try:
            return torch.autograd.grad(
                operand, proxies, chunk, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
        except RuntimeError:  # an op of the derivation without a batching rule: one sample at a time
            per_sample = [
                torch.autograd.grad(operand, proxies, row, retain_graph=True, allow_unused=True) for row in chunk
            ]
            return [
                None if per_sample[0][k] is None else torch.stack([grads[k] for grads in per_sample])
                for k in range(len(proxies))
            ]

    def take_piece(self, name: str) -> bool:
        """Whether W's only use may be a recorder piece (a layer rule's norms from the
        recorded input and output gradient) instead of the op's cotangent; marks it so."""
        if self.counts.get(name, 0) != 1:
            return False
        self.methods[name] = "linear"  # taken from the recorder's results
        self.single.discard(name)
        return True

    def linear_piece(
        self,
        name: str,
        inputs: torch.Tensor,
        output: torch.Tensor,
        batch_dim: int,
        fold: int,
        record: Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor],
    ) -> torch.Tensor:
        """F.linear(x, W) with a direct W: the recorder's linear piece when it is W's
        only use (the linear rule's norms), else Σ_t g_t x_tᵀ added per sample."""
        if self.take_piece(name):
            return record(inputs, output, batch_dim, fold)
        self.methods[name] = "op-vjp"
        saved = inputs.detach()

        def per_sample(tensor: torch.Tensor) -> torch.Tensor:
            if fold > 1:
                return tensor.reshape(tensor.shape[0] // fold, fold, *tensor.shape[1:])
            return tensor.movedim(batch_dim, 0)

        def on_grad(grad):
            activations = per_sample(saved)
            grads = per_sample(grad)
            activations = activations.reshape(activations.shape[0], -1, activations.shape[-1])
            grads = grads.reshape(grads.shape[0], -1, grads.shape[-1])
            rows = max(1, _CHUNK_ELEMENTS // max(1, self.numels[name]))
            for start in range(0, grads.shape[0], rows):
                self._add(
                    name, start, outer_product_sums(activations[start : start + rows], grads[start : start + rows])
                )

        return on_gradient(output, on_grad) if output.requires_grad else output  # a copy where it is a view

    def squared_norms(self, name: str) -> torch.Tensor:
        if name in self.single:
            return self.squared[name]
        dense = self.dense.get(name)
        if dense is None:
            return torch.zeros(self.batch, dtype=self.dtype, device=next(iter(self.proxies.values())).device)
        return dense.square().sum(1)

    def gradients(self, name: str) -> DenseLayerGradients:
        dense = self.dense.get(name)
        if dense is None:
            device = next(iter(self.proxies.values())).device
            dense = torch.zeros(self.batch, self.numels[name], dtype=self.dtype, device=device)
        return DenseLayerGradients(self.batch, {"value": self.numels[name]}, lambda s, e: {"value": dense[s:e]})

    def method(self, name: str) -> str:
        return self.methods.get(name, "unused")

    def leaves(self) -> List[torch.Tensor]:
        return list(self.proxies.values())
