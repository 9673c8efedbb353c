"""gradood::react_energy (ReAct's energy, logsumexp(W min(v, c) + b)) against a
literal float64 composition, and its behaviour as an operator."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gradood import reference, scores
from conftest import HAS_CUDA
from helpers import ScoringClassifier

# (B, C, D): C = 1 and D = 1; odd sizes; batches that split into several blocks
# of rows with a partial last one (the CPU kernel's blocks hold up to 256 rows);
# ImageNet-21k's class count.
SHAPES = [(1, 1, 1), (3, 2, 7), (17, 33, 65), (601, 10, 19), (300, 1000, 64), (3, 21843, 9), (2, 1, 2048)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _literal(features, weight, bias, clip):
    """The formula in float64, one row at a time."""
    rows = []
    for v in features.double():
        logits = weight.double() @ torch.minimum(v, torch.tensor(clip, dtype=torch.float64)) + (
            0.0 if bias is None else bias.double()
        )
        rows.append(torch.logsumexp(logits, dim=0))
    return torch.stack(rows)


def _inputs(batch, num_classes, num_features, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = (torch.randn(batch, num_features, generator=generator).relu() * 2).to(dtype).to(device)
    weight = (torch.randn(num_classes, num_features, generator=generator) / math.sqrt(num_features)).to(dtype)
    bias = torch.randn(num_classes, generator=generator).to(dtype)
    return features, weight.to(device), bias.to(device)


def _tolerance(dtype):
    """float64 and float32 differ from the float64 formula by their GEMM's
    rounding; float16/bfloat16 round the clip and the logits to the input dtype,
    as the eager composition does (logits here are O(1))."""
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12)
    if dtype in (torch.float16, torch.bfloat16):
        return dict(rtol=2e-2, atol=5e-2)
    return dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_matches_the_literal_formula(shape, dtype, with_bias, device):
    features, weight, bias = _inputs(*shape, dtype, device)
    bias = bias if with_bias else None
    clip = 0.9
    got = scores.react(features, weight, bias, clip)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == (shape[0],)
    expected = _literal(features.cpu(), weight.cpu(), None if bias is None else bias.cpu(), clip)
    torch.testing.assert_close(got.cpu().double(), expected, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_the_reference(dtype, device):
    """Same rounding as the eager composition in every dtype: the GEMM's
    summation order is the only difference."""
    features, weight, bias = _inputs(257, 100, 300, dtype, device, seed=3)
    expected = reference.react(features, weight, bias, 1.3).to(torch.float64 if dtype == torch.float64 else torch.float32)
    tolerance = dict(rtol=1e-2, atol=2e-2) if dtype in (torch.float16, torch.bfloat16) else {}
    torch.testing.assert_close(scores.react(features, weight, bias, 1.3), expected, **tolerance)


def test_non_contiguous_inputs(device):
    features, weight, bias = _inputs(300, 40, 50, torch.float32, device, seed=5)
    expected = scores.react(features, weight, bias, 0.8)
    features_t = features.t().contiguous().t()  # column-major storage
    weight_t = weight.t().contiguous().t()
    strided_bias = torch.stack([bias, bias], dim=1)[:, 0]
    assert not (features_t.is_contiguous() or weight_t.is_contiguous() or strided_bias.is_contiguous())
    torch.testing.assert_close(scores.react(features_t, weight_t, strided_bias, 0.8), expected)
    every_other = torch.stack([features, features * 0], dim=1).reshape(600, 50)[::2]
    torch.testing.assert_close(scores.react(every_other, weight, bias, 0.8), expected)


def test_infinite_clip_is_the_energy_of_the_plain_logits(device):
    features, weight, bias = _inputs(33, 7, 12, torch.float64, device)
    torch.testing.assert_close(scores.react(features, weight, bias, math.inf), torch.logsumexp(F.linear(features, weight, bias), 1))


def test_a_small_clip_makes_every_feature_the_clip(device):
    features, weight, bias = _inputs(9, 5, 6, torch.float64, device)
    features = features + 1.0  # all > 0.5
    clipped = torch.full_like(features, 0.5)
    torch.testing.assert_close(scores.react(features, weight, bias, 0.5), torch.logsumexp(F.linear(clipped, weight, bias), 1))


@given(
    batch=st.integers(1, 40),
    num_classes=st.integers(1, 50),
    num_features=st.integers(1, 60),
    clip=st.floats(0.05, 5.0),
    seed=st.integers(0, 2**16),
)
def test_property_matches_the_literal_formula(batch, num_classes, num_features, clip, seed):
    features, weight, bias = _inputs(batch, num_classes, num_features, torch.float64, torch.device("cpu"), seed)
    torch.testing.assert_close(scores.react(features, weight, bias, clip), _literal(features, weight, bias, clip), rtol=1e-12, atol=1e-12)


def test_non_finite_features_stay_in_their_row(device):
    features, weight, bias = _inputs(600, 20, 30, torch.float32, device, seed=7)
    clean = scores.react(features, weight, bias, 1.0)
    features[3, 4] = float("nan")
    features[400, 0] = float("inf")  # min(inf, c) = c: finite
    features[500, 2] = float("-inf")
    got = scores.react(features, weight, bias, 1.0)
    assert torch.isnan(got[3])
    assert torch.isfinite(got[400])
    assert not torch.isfinite(got[500])  # -inf · w: -inf, or NaN where signs of w mix
    others = torch.ones(600, dtype=torch.bool)
    others[[3, 400, 500]] = False
    torch.testing.assert_close(got[others], clean[others], rtol=1e-6, atol=1e-6)


def test_a_row_scores_the_same_alone_and_in_a_batch(device):
    features, weight, bias = _inputs(700, 30, 40, torch.float32, device, seed=9)
    batch = scores.react(features, weight, bias, 1.0)
    for row in (0, 255, 256, 699):
        alone = scores.react(features[row : row + 1], weight, bias, 1.0)
        torch.testing.assert_close(alone, batch[row : row + 1], rtol=1e-6, atol=1e-6)


def test_parameters_that_require_grad_score_under_grad_mode(device):
    """A head's own parameters go in directly; the kernel's GEMM runs on worker
    threads, below autograd. Backward through the score gives the reference's gradients."""
    head = nn.Linear(30, 12).to(device)
    features = torch.rand(900, 30, device=device, requires_grad=True)
    with torch.enable_grad():
        got = scores.react(features, head.weight, head.bias, 0.5)
    with torch.no_grad():
        expected = reference.react(features, head.weight, head.bias, 0.5)
    torch.testing.assert_close(got, expected)
    ours = torch.autograd.grad(got.sum(), [features, head.weight, head.bias])
    theirs = torch.autograd.grad(reference.react(features, head.weight, head.bias, 0.5).sum(),
                                 [features, head.weight, head.bias])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


OPCHECK_CASES = [  # (B, C, D, dtype, bias)
    (4, 10, 7, torch.float32, True),
    (3, 5, 1, torch.float64, False),
    (5, 33, 16, torch.bfloat16, True),
    (5, 33, 16, torch.float16, False),
    (0, 4, 3, torch.float32, True),
]


@pytest.mark.parametrize("batch,num_classes,num_features,dtype,with_bias", OPCHECK_CASES)
def test_opcheck(batch, num_classes, num_features, dtype, with_bias, device):
    features, weight, bias = _inputs(batch, num_classes, num_features, dtype, device)
    torch.library.opcheck(torch.ops.gradood.react_energy.default, (features, weight, bias if with_bias else None, 0.7))


def _react_head() -> ScoringClassifier:
    return ScoringClassifier(lambda logits, features, head: scores.react(features, head.weight, head.bias, 0.6))


def test_torch_compile_fullgraph_and_export():
    torch._dynamo.reset()
    model = _react_head().eval()
    inputs = torch.randn(8, 12)
    with torch.no_grad():
        expected = model(inputs)[1]
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(inputs)[1], expected)
    exported = torch.export.export(model, (inputs,))
    assert any("gradood.react_energy" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(inputs)[1], expected)


@pytest.mark.parametrize("args,message", [
    ((torch.randn(2, 3), torch.randn(4, 5), None, 1.0), r"weight must be \[C, 3\]"),
    ((torch.randn(2, 3), torch.randn(0, 3), None, 1.0), "C >= 1"),
    ((torch.randn(2, 3), torch.randn(4, 3), torch.randn(5), 1.0), r"bias must be \[4\]"),
    ((torch.randn(2, 3), torch.randn(4, 3, dtype=torch.float64), None, 1.0), "weight must have the features' dtype"),
    ((torch.randn(2, 3), torch.randn(4, 3), torch.randn(4, dtype=torch.float64), 1.0), "bias must have the features' dtype"),
    ((torch.ones(2, 3, dtype=torch.int32), torch.ones(4, 3, dtype=torch.int32), None, 1.0), "features must be float32"),
    ((torch.randn(2, 3, 1), torch.randn(4, 3), None, 1.0), "features must be 2-D"),
    ((torch.randn(2, 3), torch.randn(4, 3), None, 0.0), "clip must be > 0"),
    ((torch.randn(2, 3), torch.randn(4, 3), None, float("nan")), "clip must be > 0"),
])
def test_c_plus_plus_checks_guard_the_raw_op(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.gradood.react_energy(*args)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_runs_on_the_current_stream_and_refuses_mixed_devices():
    features, weight, bias = _inputs(513, 1000, 256, torch.float32, torch.device("cuda"))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = scores.react(features, weight, bias, 1.0)
    stream.synchronize()
    torch.testing.assert_close(got, reference.react(features, weight, bias, 1.0))
    with pytest.raises((RuntimeError, ValueError), match="device"):
        torch.ops.gradood.react_energy(features, weight.cpu(), None, 1.0)
