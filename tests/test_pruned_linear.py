"""gradood::top_features and gradood::pruned_linear (ASH's pruning and the head on the kept
features, CPU kernels) against ATen compositions in float64, and ASH through them."""

from __future__ import annotations

import math

import pytest
import torch

from gradood._ops import PRUNED_LINEAR_BLOCK, cpu_capability, pruned_linear_blocks
from gradood.detectors import ASH
from gradood.detectors import ash as ash_module
from gradood.detectors.ash import _kept

ops = torch.ops.gradood


def _reference_selection(features: torch.Tensor, keep: int):
    mask, _ = _kept(features, keep)
    indices = torch.stack([row.nonzero().squeeze(1) for row in mask])
    values = features.gather(1, indices)
    return values, indices, features.double().sum(1), values.double().sum(1)


def _rows(kind: str, batch: int, count: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "relu":
        return torch.randn(batch, count, generator=generator, dtype=dtype).relu()
    if kind == "signed":
        return torch.randn(batch, count, generator=generator, dtype=dtype)
    if kind == "ties":  # few distinct values: ties at every threshold, both zeros
        rows = torch.randint(-2, 3, (batch, count), generator=generator).to(dtype)
        return torch.where(torch.rand(batch, count, generator=generator) < 0.5, rows, -rows)  # -0.0 and 0.0
    if kind == "wide":  # magnitudes over the whole range, subnormals, infinities
        rows = torch.randn(batch, count, generator=generator, dtype=dtype) * torch.logspace(-40, 30, count, dtype=dtype)
        if count >= 3:
            rows[:, :3] = torch.tensor([math.inf, -math.inf, 1e-45], dtype=dtype)
        return rows
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["relu", "signed", "ties", "wide"])
@pytest.mark.parametrize("count,keep", [(1, 1), (7, 3), (64, 64), (300, 1), (2048, 205), (5000, 4999)])
def test_top_features_is_the_deterministic_selection(dtype, kind, count, keep):
    features = _rows(kind, 9, count, dtype, seed=count + keep)
    values, indices, total, kept_sum = ops.top_features(features, keep)
    want_values, want_indices, want_total, want_kept = _reference_selection(features, keep)
    assert torch.equal(indices, want_indices)
    assert torch.equal(values, want_values)  # -0.0 and 0.0 kept as they are
    assert torch.equal(torch.signbit(values), torch.signbit(want_values))
    torch.testing.assert_close(total, want_total, rtol=1e-12, atol=0, equal_nan=True)
    torch.testing.assert_close(kept_sum, want_kept, rtol=1e-12, atol=0, equal_nan=True)


def test_top_features_of_a_nan_row_and_non_contiguous_input():
    features = torch.rand(6, 40, dtype=torch.float64)[:, ::2]  # non-contiguous
    features[2, 5] = math.nan
    values, indices, total, kept_sum = ops.top_features(features, 4)
    assert values[2].isnan().all() and total[2].isnan() and kept_sum[2].isnan()
    assert torch.equal(indices[2], torch.arange(4))
    rest = [0, 1, 3, 4, 5]
    want = _reference_selection(features[rest], 4)
    assert torch.equal(indices[rest], want[1]) and torch.equal(values[rest], want[0])


def test_top_features_errors():
    with pytest.raises(RuntimeError, match=r"keep must be in \[1, 5\]"):
        ops.top_features(torch.rand(2, 5), 6)
    with pytest.raises(RuntimeError, match="keep must be in"):
        ops.top_features(torch.rand(2, 5), 0)
    with pytest.raises(RuntimeError, match="features must be float32 or float64"):
        ops.top_features(torch.rand(2, 5).half(), 2)
    with pytest.raises(RuntimeError, match=r"features must be 2-D"):
        ops.top_features(torch.rand(5), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("classes", [1, 10, 63, 64, 65, 130, 1000])
@pytest.mark.parametrize("batch", [1, 3, 300])
def test_pruned_linear_is_the_head_on_the_pruned_features(dtype, classes, batch):
    generator = torch.Generator().manual_seed(classes * 7 + batch)
    count, keep = 97, 12
    features = torch.randn(batch, count, generator=generator, dtype=dtype).relu()
    weight = torch.randn(classes, count, generator=generator, dtype=dtype)
    values, indices, _, _ = ops.top_features(features, keep)
    blocks = pruned_linear_blocks(weight)
    assert blocks.shape == (-(-classes // PRUNED_LINEAR_BLOCK), count, PRUNED_LINEAR_BLOCK)
    out = ops.pruned_linear(values, indices, blocks, classes)
    pruned = torch.zeros(batch, count, dtype=torch.float64).scatter_(1, indices, values.double())
    exact = pruned @ weight.double().T
    bound = (pruned.abs() @ weight.double().abs().T) * keep * torch.finfo(dtype).eps
    assert out.dtype == dtype and out.shape == (batch, classes)
    assert bool(((out.double() - exact).abs() <= bound).all())
    # batch-invariant: a row's logits do not depend on the other rows
    assert torch.equal(ops.pruned_linear(values[-1:], indices[-1:], blocks, classes), out[-1:])


def test_pruned_linear_errors():
    values, indices = torch.rand(2, 3), torch.tensor([[0, 1, 2], [1, 2, 5]])
    blocks = pruned_linear_blocks(torch.rand(10, 5))
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 5\).*got \[0, 5\]"):
        ops.pruned_linear(values, indices, blocks, 10)
    with pytest.raises(RuntimeError, match=r"indices must lie in"):
        ops.pruned_linear(values, -indices, blocks, 10)
    with pytest.raises(RuntimeError, match=r"weight_blocks must be \[2, D, 64\] for 70 classes"):
        ops.pruned_linear(values, indices.clamp_max(4), blocks, 70)
    with pytest.raises(RuntimeError, match="indices must be int64"):
        ops.pruned_linear(values, indices.int(), blocks, 10)
    with pytest.raises(RuntimeError, match="weight_blocks must have the values' dtype"):
        ops.pruned_linear(values, indices.clamp_max(4), blocks.double(), 10)
    assert ops.pruned_linear(values[:0], indices[:0], blocks, 10).shape == (0, 10)


def test_opcheck():
    features = torch.rand(4, 33)
    torch.library.opcheck(ops.top_features.default, (features, 5))
    values, indices, _, _ = ops.top_features(features, 5)
    torch.library.opcheck(ops.pruned_linear.default, (values, indices, pruned_linear_blocks(torch.rand(70, 33)), 70))


@pytest.mark.parametrize("shaping", ["s", "b", "p", "scale"])
@pytest.mark.parametrize("kind", ["relu", "ties", "signed"])
def test_the_cpu_products_equal_the_aten_composition(shaping, kind):
    features = _rows(kind, 300, 256, torch.float64, seed=3)  # B >= 256: the pruned product
    weight = torch.randn(70, 256, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    products, scale = ash_module._shaped_products_cpu(features, weight, shaping, 20, None)
    want_products, want_scale = ash_module._shaped_products(features, weight, shaping, 20)
    torch.testing.assert_close(scale, want_scale, rtol=1e-12, atol=0, equal_nan=True)
    torch.testing.assert_close(products, want_products, rtol=1e-10, atol=1e-10, equal_nan=True)


def test_the_detector_builds_the_blocked_head_once(monkeypatch):
    if cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the pruned product is used at AVX2 and AVX-512 only")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.ReLU(), torch.nn.Linear(256, 90)).eval()
    inputs = torch.randn(8, 16)
    built = []
    original = ash_module.pruned_linear_blocks
    monkeypatch.setattr(ash_module, "pruned_linear_blocks", lambda w: built.append(1) or original(w))
    detector = ASH(model, variant="s", percentile=90)
    first = detector.score(inputs)
    for _ in range(3):
        assert torch.equal(detector.score(inputs), first)
    assert len(built) == 1
    with torch.no_grad():
        features = model[1](model[0](inputs))
        want = ash_module.shaped_energy(features, model[2].weight, model[2].bias, "s", 90, "test")
    torch.testing.assert_close(first, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        model[2].weight.mul_(2.0)  # in place: rebuilt
    detector.score(inputs)
    assert len(built) == 2


def test_a_model_built_in_inference_mode_is_scored_without_the_cache():
    torch.manual_seed(1)
    with torch.inference_mode():
        model = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.ReLU(), torch.nn.Linear(256, 70)).eval()
    inputs = torch.randn(5, 16)
    with torch.no_grad():
        features = model[1](model[0](inputs))
        want = ash_module.shaped_energy(features, model[2].weight, model[2].bias, "s", 90, "test")
    torch.testing.assert_close(ASH(model, variant="s", percentile=90).score(inputs), want, rtol=1e-6, atol=1e-6)
