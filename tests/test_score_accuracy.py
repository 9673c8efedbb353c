"""float32 accuracy of the fused scores against float64, compared with torch's own
float32 ops on the same rows: at least as accurate at every row length (C = 10 to
21,843), on spread, near-uniform and confident rows, at T = 1 and T = 1000 (ODIN's),
including how many pairs of rows each orders differently from float64."""

from __future__ import annotations

import math

import pytest
import torch

from gradood import reference, scores

_ULP = 2.0**-23


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


@pytest.mark.parametrize("num_classes", [2, 10, 32, 33, 1000])
def test_energy_is_accurate_wherever_the_other_classes_mass_lies(num_classes):
    # Rows whose mass outside the max, Σ_{j≠argmax} exp(f_j − max), takes every scale from 1e-38
    # to C − 1: the max at 0 and the rest at one value a (k of them), with a from −87 to 0. At max
    # = 0 the energy is log1p of that mass, so this measures the log1p of each kernel (one per
    # vector of short rows) against float64 at its relative precision. The bound, 6 ulp, is the
    # exp and the row sum's rounding (C = 1000 reaches 3.9 ulp); torch.logsumexp, taking
    # log(1 + s), is off by 2^23 ulp on these rows at T = 1.
    offsets = torch.cat([-torch.logspace(-7, math.log10(87.0), 700), torch.tensor([0.0, -1e-30])])
    rows = []
    for count in sorted({1, num_classes // 2, num_classes - 1}):
        block = torch.full((offsets.numel(), num_classes), -math.inf)
        block[:, 0] = 0.0
        block[:, 1 : 1 + count] = offsets[:, None]
        rows.append(block)
    logits = torch.cat(rows)
    logits = logits[:, torch.randperm(num_classes, generator=torch.Generator().manual_seed(0))]  # the max anywhere
    for temperature in (1.0, 1000.0):
        # float64 max + log1p(mass of the others): torch.logsumexp takes log(1 + s), exact
        # only to 1e-16 absolute, which is no reference for an energy of 1e-17.
        scaled = logits.double() / temperature
        top, where = scaled.max(1, keepdim=True)
        others = (scaled - top).exp().scatter(1, where, 0.0).sum(1)
        exact = temperature * (top.squeeze(1) + others.log1p())
        ours = scores.energy(logits, temperature=temperature).double()
        error = ((ours - exact) / exact.abs().clamp_min(1e-300)).abs()
        assert float(error.max()) <= 6 * _ULP, (temperature, float(error.max()), logits[int(error.argmax())])
