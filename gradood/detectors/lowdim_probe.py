"""The linear probe of LowDimGrad's base scores: BatchNorm1d(K) → Linear(K, C) on
the low-dimensional gradients G_low, trained on the ID fit samples with
cross-entropy against their classes (the labels, or the model's predictions), as
the official code of "Low-Dimensional Gradient Helps Out-of-Distribution
Detection" (Wu et al., TPAMI 2024) trains it: SGD with momentum 0.9 and weight
decay 5e-4, learning rate 0.1 and 10 epochs by default, minibatches of a seeded
random permutation per epoch (a final minibatch of one sample, which BatchNorm
cannot train on, is skipped).

Deterministic: the probe's initialisation draws from torch's generator seeded with
`seed` (inside a forked RNG state: the caller's random state is untouched) and the
permutations from a CPU generator seeded with `seed`; the same seed, data and
device give the same weights. In eval mode the probe is an affine map,
h = s ⊙ x + t (BatchNorm with its running statistics), logits = W h + b.
"""

from __future__ import annotations

from typing import Dict, Tuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from gradood.detectors._base import fitted
from gradood.gradient_subspace import progress_bar

ProbeState = Dict[str, torch.Tensor]


def _layers(probe: nn.Sequential) -> Tuple[nn.BatchNorm1d, nn.Linear]:
    return cast(nn.BatchNorm1d, probe[0]), cast(nn.Linear, probe[1])


def probe_module(dim: int, num_classes: int) -> nn.Sequential:
    """An untrained probe: BatchNorm1d(dim) → Linear(dim, num_classes)."""
    return nn.Sequential(nn.BatchNorm1d(dim), nn.Linear(dim, num_classes))


def train_probe(
    rows: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    lr: float = 0.1,
    epochs: int = 10,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> ProbeState:
    """The trained probe's state (BatchNorm's weight, bias, running mean and
    variance; the linear layer's weight and bias) on the rows' device and dtype."""
    x = rows.detach()
    y = targets.to(x.device).long()
    generator = torch.Generator().manual_seed(seed)
    devices = [x.device] if x.device.type == "cuda" else []
    report = progress_bar(progress, "LowDimGrad probe")
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        torch.manual_seed(seed)
        probe = probe_module(x.shape[1], num_classes).to(x.device, x.dtype)
        probe.train()
        optimiser = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=generator).to(x.device)
            for start in range(0, x.shape[0], batch_size):
                index = order[start : start + batch_size]
                if index.numel() < 2:
                    continue
                loss = F.cross_entropy(probe(x[index]), y[index])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                report.update(index.numel())
    report.close()
    norm, linear = _layers(probe)
    return {
        "norm_weight": norm.weight.detach().clone(),
        "norm_bias": norm.bias.detach().clone(),
        "running_mean": fitted(norm.running_mean).detach().clone(),
        "running_var": fitted(norm.running_var).detach().clone(),
        "weight": linear.weight.detach().clone(),
        "bias": linear.bias.detach().clone(),
    }


def normalisation(state: ProbeState, eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """(s, t) of the eval-mode BatchNorm: h = s ⊙ x + t, s = γ / √(var + eps), t = β − s·mean."""
    scale = state["norm_weight"] / torch.sqrt(state["running_var"] + eps)
    return scale, state["norm_bias"] - scale * state["running_mean"]


def load_probe(state: ProbeState) -> nn.Sequential:
    """The probe as an eval-mode module (for checks and export)."""
    probe = probe_module(state["weight"].shape[1], state["weight"].shape[0]).to(
        state["weight"].device, state["weight"].dtype
    )
    norm, linear = _layers(probe)
    with torch.no_grad():
        norm.weight.copy_(state["norm_weight"])
        norm.bias.copy_(state["norm_bias"])
        fitted(norm.running_mean).copy_(state["running_mean"])
        fitted(norm.running_var).copy_(state["running_var"])
        linear.weight.copy_(state["weight"])
        linear.bias.copy_(state["bias"])
    return probe.eval()
