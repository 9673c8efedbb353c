"""float32 accuracy of the fused scores against float64, compared with torch's own
float32 ops on the same rows: at least as accurate at every row length (C = 10 to
21,843), on spread, near-uniform and confident rows, at T = 1 and T = 1000 (ODIN's),
including how many pairs of rows each orders differently from float64."""

from __future__ import annotations

import pytest
import torch

from gradood import reference, scores

_ULP = 2.0 ** -23


def _rows(num_classes: int, kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(384, num_classes, generator=generator) * (1e-3 if kind == "near_uniform" else 3.0)
    if kind == "confident":
        logits[:, 0] += 30.0
    return logits


def _relative(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((got.double() - exact) / exact.abs().clamp_min(1e-300)).abs().max())


def _inverted_pairs(got: torch.Tensor, exact: torch.Tensor) -> int:
    return int(((got[:, None] > got[None, :]) & (exact[:, None] < exact[None, :])).sum())


@pytest.mark.parametrize("num_classes", [10, 1000, 21843])
@pytest.mark.parametrize("kind", ["spread", "near_uniform", "confident"])
@pytest.mark.parametrize("temperature", [1.0, 1000.0])
def test_float32_scores_are_at_least_as_accurate_as_torch(num_classes, kind, temperature):
    logits = _rows(num_classes, kind)
    exact_msp = torch.softmax(logits.double() / temperature, 1).amax(1)
    exact_energy = temperature * torch.logsumexp(logits.double() / temperature, 1)
    torch_msp = torch.softmax(logits / temperature, 1).amax(1)
    torch_energy = temperature * torch.logsumexp(logits / temperature, 1)
    ours_msp = scores.msp(logits, temperature=temperature)
    ours_energy = scores.energy(logits, temperature=temperature)
    floor = 2 * _ULP  # below this both are round-off of the output itself
    assert _relative(ours_msp, exact_msp) <= max(_relative(torch_msp, exact_msp), floor)
    assert _relative(ours_energy, exact_energy) <= max(1.1 * _relative(torch_energy, exact_energy), floor)
    assert _inverted_pairs(ours_msp, exact_msp) <= _inverted_pairs(torch_msp, exact_msp) + 2


@pytest.mark.parametrize("num_classes", [10, 1000, 21843])
def test_gradnorm_output_term_is_at_least_as_accurate_as_the_torch_composition(num_classes):
    logits = _rows(num_classes, "spread")
    features = torch.ones(logits.shape[0], 1)  # V = 1: the output term alone
    exact = reference.gradnorm(logits.double(), features.double())
    composed = reference.gradnorm(logits, features)
    ours = scores.gradnorm(logits, features)
    assert _relative(ours, exact) <= max(_relative(composed, exact), 2 * _ULP)
