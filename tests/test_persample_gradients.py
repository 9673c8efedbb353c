"""gradood.persample_gradients (the per-sample gradient operator) against a
literal per-sample backward loop in float64: projections, weighted sums and
moments for every layer rule, without materialising the network's gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradood.persample import persample_gradients
from gradood.persample import _grads, linear
from gradood.persample.losses import per_sample_loss
from test_persample import MODELS, _float64, _vit

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


def _loop_grads(model, inputs, loss="logsumexp", names=None, **kwargs):
    """Ground truth: one backward per sample, float64, {name: [B, *shape]}."""
    model = copy.deepcopy(model)
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)}
    grads = {n: [] for n in parameters}
    for i in range(inputs.shape[0]):
        model.zero_grad(set_to_none=True)
        per_sample_loss(model(inputs[i : i + 1]), loss, 1.0, None).sum().backward()
        for n, p in parameters.items():
            grads[n].append(torch.zeros_like(p) if p.grad is None else p.grad.clone())
    return {n: torch.stack(g) for n, g in grads.items()}


def _flat(grads, names):
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], 1)


def _check_operator(result, expected, seed=0):
    """project, weighted_sum, moments and materialise against the dense matrix."""
    names = list(expected)
    assert set(result.names) == set(names)
    dense = _flat(expected, names)  # [B, P]
    generator = torch.Generator().manual_seed(seed)
    directions = {n: torch.randn(6, expected[n][0].numel(), generator=generator, dtype=torch.float64) for n in names}
    torch.testing.assert_close(result.project(directions), dense @ _flat_directions(directions, names).T, rtol=1e-9, atol=1e-12)
    weights = torch.randn(dense.shape[0], 3, generator=generator, dtype=torch.float64)
    sums = result.weighted_sum(weights)
    for n in names:
        torch.testing.assert_close(sums[n], weights.T @ expected[n].reshape(dense.shape[0], -1), rtol=1e-9, atol=1e-12)
    moments = result.moments()
    for n in names:
        flat = expected[n].reshape(dense.shape[0], -1)
        torch.testing.assert_close(moments[n][0], flat.mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(moments[n][1], (flat - flat.mean(0)).square().sum(0), rtol=1e-9, atol=1e-12)
    materialised = result.materialise()
    for n in names:
        torch.testing.assert_close(materialised[n], expected[n], rtol=1e-9, atol=1e-12)


def _flat_directions(directions, names):
    return torch.cat([directions[n] for n in names], 1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_operator_matches_the_per_sample_loop(name):
    model, inputs = _float64(name)
    _check_operator(persample_gradients(model, inputs, "logsumexp"), _loop_grads(model, inputs))


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_and_broadcast_parameters(batch_first):
    model, inputs = _vit(batch_first)
    _check_operator(persample_gradients(model, inputs, "logsumexp", functional_params="broadcast"), _loop_grads(model, inputs))


def test_torch_func_fallback():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.PReLU(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double().eval()
    inputs = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    _check_operator(persample_gradients(model, inputs, "logsumexp", fallback="torch.func"), _loop_grads(model, inputs))


def test_selected_parameters_only():
    model, inputs = _float64("residual_cnn")
    names = ["head.weight", "down.bias", "bn2.weight"]
    result = persample_gradients(model, inputs, "logsumexp", params=names)
    _check_operator(result, _loop_grads(model, inputs, names=names))


def test_unused_layer_gives_zero_gradients():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = Model().double().eval()
    inputs = torch.randn(4, 3, dtype=torch.float64)
    _check_operator(persample_gradients(model, inputs, "logsumexp"), _loop_grads(model, inputs))


def test_chunked_materialisation_matches(monkeypatch):
    """Chunks of one sample (the bound hit everywhere) give the same reductions."""
    monkeypatch.setattr(_grads, "_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(linear, "_CHUNK_ELEMENTS", 1)  # the rank-one path's row blocks
    for name in ("residual_cnn", "sequence"):
        model, inputs = _float64(name)
        _check_operator(persample_gradients(model, inputs, "logsumexp"), _loop_grads(model, inputs))


def test_rank_one_linear_path_and_its_fallback():
    """A 2-D-input Linear projects without forming g aᵀ when K < d, and falls back
    to materialised chunks when K ≥ d; both against the loop."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 4)).double().eval()
    inputs = torch.randn(6, 9, dtype=torch.float64)
    result, expected = persample_gradients(model, inputs, "logsumexp"), _loop_grads(model, inputs)
    assert isinstance(result._layers[0][1], linear.RankOneGradients)
    names = list(expected)
    dense = _flat(expected, names)
    for count in (3, 8, 12):  # K < d for both layers, between, K ≥ d for both
        directions = {n: torch.randn(count, expected[n][0].numel(), dtype=torch.float64) for n in names}
        torch.testing.assert_close(result.project(directions), dense @ _flat_directions(directions, names).T, rtol=1e-10, atol=1e-12)
        weights = torch.randn(6, count, dtype=torch.float64)
        sums = result.weighted_sum(weights)
        for n in names:
            torch.testing.assert_close(sums[n], weights.T @ expected[n].reshape(6, -1), rtol=1e-10, atol=1e-12)


def test_half_precision_directions_are_upcast_in_blocks(monkeypatch):
    monkeypatch.setattr(_grads, "_UPCAST_ELEMENTS", 8)
    model, inputs = _float64("mlp_4d")
    model, inputs = model.float(), inputs.float()
    result = persample_gradients(model, inputs, "logsumexp")
    expected = _flat(_loop_grads(model.double(), inputs.double()), result.names)
    directions = {n: torch.randn(5, int(torch.Size(s).numel())).bfloat16() for n, s in result.shapes.items()}
    flat_directions = torch.cat([directions[n].double() for n in result.names], 1)
    torch.testing.assert_close(result.project(directions).double(), expected @ flat_directions.T, rtol=1e-4, atol=1e-5)


def test_bfloat16_model_reduces_in_float32():
    model, inputs = _float64("residual_cnn")
    result = persample_gradients(model.bfloat16(), inputs.bfloat16(), "logsumexp")
    moments = result.moments()
    assert all(mean.dtype == torch.float32 for mean, _ in moments.values())


def test_errors():
    model, inputs = _float64("mlp_4d")
    result = persample_gradients(model, inputs, "logsumexp")
    with pytest.raises(ValueError, match="no directions for"):
        result.project({})
    with pytest.raises(ValueError, match="weights must be"):
        result.weighted_sum(torch.ones(inputs.shape[0] + 1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="gradood.persample_gradients: inputs must be a non-empty batch"):
        persample_gradients(model, inputs[:0])
    model.train()
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).train()
    with pytest.raises(ValueError, match="gradood.persample_gradients: .*call model.eval"):
        persample_gradients(bn, torch.randn(4, 3))


def test_model_is_left_untouched():
    model, inputs = _float64("residual_cnn")
    before = copy.deepcopy(model.state_dict())
    persample_gradients(model, inputs).moments()
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_half_directions_use_one_float32_accumulating_gemm():
    model, inputs = _float64("residual_cnn")
    expected = _loop_grads(model, inputs)
    names = list(expected)
    result = persample_gradients(model.float().cuda(), inputs.float().cuda(), "logsumexp")
    generator = torch.Generator().manual_seed(1)
    directions = {n: torch.randn(16, expected[n][0].numel(), generator=generator) for n in names}
    exact = _flat(expected, names) @ _flat_directions({n: d.double() for n, d in directions.items()}, names).T
    for dtype in (torch.bfloat16, torch.float16):
        half = {n: d.to(dtype).cuda() for n, d in directions.items()}
        projected = result.project(half)
        assert projected.dtype == torch.float32
        torch.testing.assert_close(projected.double().cpu(), exact, rtol=0, atol=2e-2 * float(exact.abs().max()))
