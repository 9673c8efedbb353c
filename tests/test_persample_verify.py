"""The single-sample check of the per-sample engine (gradood/persample/_verify.py):
models whose batch rows are not their samples' own computations give an error,
never a wrong number. Each model below gave wrong norms silently before it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradood.persample import persample_grad_norms, persample_gradients
from test_persample import _loop_norms


class _MixesSamples(nn.Module):
    """Subtracts the batch mean: every sample's output depends on the others."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        hidden = torch.tanh(self.a(x))
        return self.head(hidden - hidden.mean(0, keepdim=True))


class _Reorders(nn.Module):
    """Sorts the batch, applies a layer, and un-sorts (as before sequence packing)."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        order = x[:, 0].argsort()
        hidden = torch.tanh(self.a(x[order]))
        return self.head(hidden[order.argsort()])


def _replacing_hook_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    model[0].register_forward_hook(lambda module, args, output: output * output)  # replaces the layer's output
    return model


@pytest.mark.parametrize("build", [_MixesSamples, _Reorders, _replacing_hook_model], ids=["mixes", "reorders", "hook"])
def test_models_whose_rows_are_not_their_samples_are_errors(build):
    torch.manual_seed(0)
    model = build().double().eval()
    inputs = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="single-sample check failed"):
        persample_grad_norms(model, inputs)
    with pytest.raises(ValueError, match="single-sample check failed"):
        persample_gradients(model, inputs)


def test_the_check_can_be_skipped_and_then_the_norms_are_the_batch_pass():
    torch.manual_seed(0)
    model = _MixesSamples().double().eval()
    inputs = torch.randn(5, 4, dtype=torch.float64)
    norms = persample_grad_norms(model, inputs, verify=False).norms
    assert not torch.allclose(norms, _loop_norms(model, inputs))  # what the check protects from


def test_a_passing_check_runs_once_per_model_and_signature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    for _ in range(2):
        persample_grad_norms(model, torch.randn(6, 4, dtype=torch.float64))
    assert calls == [2, 3, 3, 1, 1, 1, 6, 6]
