"""The CUDA kernels themselves, run on the CPU emulation of the CUDA execution
model (tests/cuda_emulation.py), against the CPU operators (which the other
tests hold to the literal definitions). This is how the kernels' indexing,
tiling, bounds, grid-stride loops and reductions are tested where no GPU is
present; on a GPU the CUDA registrations are tested directly (the `device`
fixture's CUDA cases)."""

from __future__ import annotations

import math

import pytest
import torch

import gradood  # noqa: F401  (registers the CPU operators)
import cuda_emulation

pytestmark = pytest.mark.skipif(cuda_emulation.unavailable_reason() is not None,
                                reason=f"CUDA emulation: {cuda_emulation.unavailable_reason()}")
op = torch.ops.gradood
METHODS = {"ghost": cuda_emulation.GHOST, "materialise": cuda_emulation.MATERIALISE}


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return cuda_emulation.build(tmp_path_factory.mktemp("cuda_emulation"))


OUTER_SHAPES = [  # N, T, d, p: tiles beyond the emulated grid limit of 3 take the grid-stride loop
    (3, 5, 7, 4),  # direct (28 outputs)
    (2, 70, 130, 65),  # materialise: 2×3 tiles
    (1, 200, 9, 5),  # ghost: 4 position tiles, 10 pairs
    (1, 1, 1, 1),
    (2, 129, 3, 2),
    (4, 2, 1, 9),
    (2, 3, 33, 1),  # 33 outputs: just past the direct path
    (0, 3, 4, 5),
    (2, 0, 3, 4),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", OUTER_SHAPES, ids=str)
def test_outer_product_kernel_equals_the_cpu_operator(kernels, shape, method):
    generator = torch.Generator().manual_seed(sum(shape))
    count, positions, in_features, out_features = shape
    activations = torch.randn(count, positions, in_features, generator=generator, dtype=torch.float64)
    grads = torch.randn(count, positions, out_features, generator=generator, dtype=torch.float64)
    result = cuda_emulation.outer_product_sq_norm(kernels, activations, grads, METHODS[method])
    expected = op.outer_product_sq_norm(activations, grads, method)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_outer_product_kernel_reads_strided_views(kernels, method):
    base = torch.randn(6, 70, 9, dtype=torch.float64)
    activations = base.transpose(1, 2)[:, :, ::2]  # [6, 9, 35]: no unit stride
    grads = torch.randn(9, 6, 40, dtype=torch.float64).transpose(0, 1)
    result = cuda_emulation.outer_product_sq_norm(kernels, activations, grads, METHODS[method])
    torch.testing.assert_close(result, op.outer_product_sq_norm(activations, grads, method), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_outer_product_kernel_accumulates_in_float32(kernels, dtype, method):
    activations = (torch.randn(3, 70, 40) * 4).to(dtype)
    grads = torch.randn(3, 70, 20).to(dtype)
    result = cuda_emulation.outer_product_sq_norm(kernels, activations, grads, METHODS[method])
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, op.outer_product_sq_norm(activations, grads, method), rtol=2e-6, atol=0)


CONV_CASES = [  # B, C_in, C_out, H, W, kernel, stride, dilation, groups
    (2, 3, 4, 9, 7, (3, 3), (1, 1), (1, 1), 1),
    (2, 6, 6, 11, 10, (3, 2), (2, 1), (2, 1), 3),
    (3, 8, 8, 13, 13, (3, 3), (1, 1), (1, 1), 8),  # depthwise: the direct kernel
    (2, 4, 8, 20, 20, (5, 5), (2, 2), (1, 1), 4),  # depthwise, multiplier 2 (50 outputs: tiled)
    (1, 70, 66, 9, 9, (1, 1), (1, 1), (1, 1), 1),  # 2×2 tiles
    (2, 16, 72, 12, 12, (3, 3), (1, 1), (1, 1), 1),  # 2×3 tiles: grid-stride
    (2, 5, 3, 1, 17, (1, 4), (1, 3), (1, 2), 1),  # Conv1d as height 1
    (1, 2, 2, 19, 19, (3, 3), (1, 1), (1, 1), 1),  # 289 positions: 15 ghost pairs
]


def _conv_inputs(case, dtype=torch.float64, seed=0):
    batch, channels, out_channels, height, width, kernel, stride, dilation, groups = case
    generator = torch.Generator().manual_seed(seed)
    padded = torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64).to(dtype)
    out_h = (height - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    grad_output = torch.randn(batch, out_channels, out_h, out_w, generator=generator, dtype=torch.float64).to(dtype)
    return padded, grad_output, kernel, stride, dilation, groups


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_kernel_equals_the_cpu_operator(kernels, case, method):
    padded, grad_output, kernel, stride, dilation, groups = _conv_inputs(case)
    result = cuda_emulation.conv2d_weight_sq_norm(kernels, padded, grad_output, kernel, stride, dilation, groups,
                                                  METHODS[method])
    expected = op.conv2d_weight_sq_norm(padded, grad_output, list(kernel), list(stride), list(dilation), groups, method)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_conv2d_kernel_reads_channels_last(kernels, method):
    padded, grad_output, *args = _conv_inputs((2, 8, 16, 10, 10, (3, 3), (1, 1), (1, 1), 2))
    expected = op.conv2d_weight_sq_norm(padded, grad_output, *[list(a) for a in args[:3]], args[3], method)
    result = cuda_emulation.conv2d_weight_sq_norm(kernels, padded.to(memory_format=torch.channels_last),
                                                  grad_output.to(memory_format=torch.channels_last), *args,
                                                  METHODS[method])
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_conv2d_kernel_accumulates_in_float32(kernels, dtype):
    padded, grad_output, kernel, stride, dilation, groups = _conv_inputs((2, 6, 6, 11, 10, (3, 2), (2, 1), (2, 1), 3),
                                                                         dtype)
    for method, code in METHODS.items():
        result = cuda_emulation.conv2d_weight_sq_norm(kernels, padded, grad_output, kernel, stride, dilation, groups,
                                                      code)
        expected = op.conv2d_weight_sq_norm(padded, grad_output, list(kernel), list(stride), list(dilation), groups,
                                            method)
        torch.testing.assert_close(result, expected, rtol=2e-6, atol=0)


LASTLAYER_CASES = [  # B, C, D (None: logits only); a warp per row where C + D <= 1024
    (3, 10, 7), (1, 1, 1), (2, 2, None), (4, 1000, 2048), (1, 21843, 5), (5, 33, 257), (11, 31, 9),
    (2, 1000, 25),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LASTLAYER_CASES, ids=str)
def test_lastlayer_kernel_equals_the_cpu_operator(kernels, case, dtype):
    batch, classes, features_count = case
    generator = torch.Generator().manual_seed(classes)
    logits = (torch.randn(batch, classes, generator=generator) * 4).to(dtype)
    features = None if features_count is None else torch.rand(batch, features_count, generator=generator).to(dtype)
    terms, argmax = cuda_emulation.lastlayer_terms(kernels, logits, features, 1.5, 0.7)
    expected_terms, expected_argmax = op.lastlayer_terms(logits, features, 1.5, 0.7)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(terms, expected_terms, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(argmax, expected_argmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("batch,classes,num_features", [(3, 637, 645), (11, 37, 45)], ids=["block_per_row", "warp_per_row"])
def test_lastlayer_kernel_reads_rows_that_are_not_16_byte_aligned(kernels, dtype, batch, classes, num_features):
    # One element in: the first row starts 2, 4 or 8 bytes past a 16-byte boundary.
    logits = torch.randn(batch * classes + 1, dtype=dtype)[1:].view(batch, classes)
    features = torch.rand(batch * num_features + 1, dtype=dtype)[1:].view(batch, num_features)
    terms, argmax = cuda_emulation.lastlayer_terms(kernels, logits, features, 1.0, 0.5)
    expected_terms, expected_argmax = op.lastlayer_terms(logits, features, 1.0, 0.5)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(terms, expected_terms, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(argmax, expected_argmax)


def test_lastlayer_kernel_keeps_a_nan_row_to_itself(kernels):
    logits = torch.randn(3, 50) * 1e4
    logits[1, 7] = math.nan
    features = torch.rand(3, 9)
    features[2, 3] = math.inf
    terms, _ = cuda_emulation.lastlayer_terms(kernels, logits, features, 1.0, math.inf)
    expected, _ = op.lastlayer_terms(logits, features, 1.0, math.inf)
    torch.testing.assert_close(terms, expected, rtol=2e-5, atol=2e-5, equal_nan=True)
    assert torch.isfinite(terms[0]).all() and torch.isnan(terms[1, :6]).all()


@pytest.mark.parametrize("classes", [1, 3, 40, 2000])  # a warp per row, and a block per row at 2000
def test_lastlayer_kernel_takes_the_limits_of_non_finite_rows(kernels, classes):
    """The CPU operator's terms (tested against gradood.reference) on rows with a NaN, one
    or tied +inf maxima and all -inf, among finite rows: the shared row math defines them."""
    rows = [[math.nan], [math.inf], [-math.inf], [math.inf, 1.0], [math.inf, math.inf], [math.nan, 2.0]]
    logits = torch.randn(len(rows) + 2, classes, generator=torch.Generator().manual_seed(3)) * 3
    for index, row in enumerate(rows, start=1):
        values = row * classes if len(row) == 1 else row[:classes] + [-math.inf] * (classes - len(row))
        logits[index] = torch.tensor(values[:classes])
    features = torch.rand(logits.shape[0], 9)
    terms, argmax = cuda_emulation.lastlayer_terms(kernels, logits, features, 1.5, 0.7)
    expected, expected_argmax = op.lastlayer_terms(logits, features, 1.5, 0.7)
    torch.testing.assert_close(terms, expected, rtol=2e-5, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(argmax, expected_argmax)
    assert torch.isnan(terms[1, :6]).all()  # a one-class NaN row is NaN, not probability 1


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 1, 1), (3, 40, 70), (2, 33, 1), (2, 5, 0)], ids=str)
@pytest.mark.parametrize("centred", [True, False], ids=["shift", "no_shift"])
def test_norm_affine_kernel_equals_the_cpu_operator(kernels, shape, layout, centred):
    from test_persample_ops import _affine_inputs

    grad_output, inputs, shift, scale = _affine_inputs(*shape, layout, "cpu")
    shift = shift if centred else None
    weight, bias = cuda_emulation.norm_affine_grads(kernels, grad_output, inputs, shift, scale)
    expected_weight, expected_bias = op.norm_affine_grads(grad_output, inputs, shift, scale)
    torch.testing.assert_close(weight, expected_weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bias, expected_bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_norm_affine_kernel_accumulates_in_float32(kernels, dtype):
    from test_persample_ops import _affine_inputs

    grad_output, inputs, shift, scale = _affine_inputs(3, 20, 50, "channels_last", "cpu", dtype)
    weight, bias = cuda_emulation.norm_affine_grads(kernels, grad_output, inputs, shift, scale)
    expected_weight, expected_bias = op.norm_affine_grads(grad_output, inputs, shift, scale)
    torch.testing.assert_close(weight, expected_weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias, expected_bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("classes,num_features", [(37, 45), (637, 645)], ids=["warp_per_row", "block_per_row"])
def test_lastlayer_kernel_is_batch_invariant_bit_for_bit(kernels, classes, num_features):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(11, classes, generator=generator) * 4
    features = torch.rand(11, num_features, generator=generator)
    whole, _ = cuda_emulation.lastlayer_terms(kernels, logits, features, 1.0, 0.5)
    alone, _ = cuda_emulation.lastlayer_terms(kernels, logits[5:6].clone(), features[5:6].clone(), 1.0, 0.5)
    assert torch.equal(whole[5:6], alone)
