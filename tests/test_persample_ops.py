"""The per-sample squared-norm operators gradood::outer_product_sq_norm and
conv2d_weight_sq_norm: against the literal per-sample product in float64,
both methods, awkward shapes, strides, dtypes, errors, opcheck, compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import gradood  # noqa: F401  (registers the operators)

METHODS = ["ghost", "materialise"]
op = torch.ops.gradood


def literal_sq_norm(activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """‖Σ_t g_t a_tᵀ‖² per sample, the p×d product formed in float64."""
    product = torch.einsum("ntp,ntd->npd", grads.double(), activations.double())
    return product.square().sum((1, 2))


def literal_conv_sq_norm(padded, grad_output, kernel, stride, dilation, groups):
    """‖∂ℓ/∂W‖² per sample: the per-sample weight gradient of F.conv2d by autograd, in float64."""
    out = []
    for x, g in zip(padded.double(), grad_output.double()):
        weight = torch.zeros(grad_output.shape[1], padded.shape[1] // groups, *kernel, dtype=torch.float64,
                             requires_grad=True)
        y = F.conv2d(x[None], weight, stride=stride, dilation=dilation, groups=groups)
        (grad_weight,) = torch.autograd.grad(y, weight, g[None])
        out.append(grad_weight.square().sum())
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


SHAPES = [  # N, T, d, p
    (3, 5, 7, 4), (2, 70, 130, 65), (1, 1, 1, 1), (2, 129, 3, 2), (4, 2, 1, 9), (0, 3, 4, 5), (2, 0, 3, 4),
    (3, 64, 64, 64),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_outer_product_equals_the_literal_product(shape, method, device):
    count, positions, in_features, out_features = shape
    activations = torch.randn(count, positions, in_features, dtype=torch.float64, device=device)
    grads = torch.randn(count, positions, out_features, dtype=torch.float64, device=device)
    result = op.outer_product_sq_norm(activations, grads, method)
    torch.testing.assert_close(result.cpu(), literal_sq_norm(activations, grads).cpu(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_outer_product_reads_strided_views(method, device):
    base = torch.randn(6, 9, 5, dtype=torch.float64, device=device)
    activations = base.transpose(1, 2)[:, :, ::2]  # [6, 5, 5], no unit stride
    grads = torch.randn(5, 6, 3, dtype=torch.float64, device=device).transpose(0, 1)
    torch.testing.assert_close(op.outer_product_sq_norm(activations, grads, method),
                               literal_sq_norm(activations, grads).to(device), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 1e-5), (torch.bfloat16, 1e-5)])
@pytest.mark.parametrize("method", METHODS)
def test_outer_product_accumulates_half_inputs_in_float32(dtype, rtol, method, device):
    activations = torch.randn(3, 40, 17, device=device).to(dtype)
    grads = torch.randn(3, 40, 9, device=device).to(dtype)
    result = op.outer_product_sq_norm(activations, grads, method)
    assert result.dtype == torch.float32
    # The reference sees the same rounded inputs: only the accumulation may differ.
    torch.testing.assert_close(result.double().cpu(), literal_sq_norm(activations, grads).cpu(), rtol=rtol, atol=0)


CONV_CASES = [  # B, C_in, C_out, H, W, kernel, stride, dilation, groups
    (2, 3, 4, 9, 7, (3, 3), (1, 1), (1, 1), 1),
    (2, 6, 6, 11, 10, (3, 2), (2, 1), (2, 1), 3),
    (3, 8, 8, 13, 13, (3, 3), (1, 1), (1, 1), 8),  # depthwise
    (2, 4, 8, 20, 20, (5, 5), (2, 2), (1, 1), 4),  # depthwise with multiplier 2
    (1, 70, 66, 9, 9, (1, 1), (1, 1), (1, 1), 1),
    (2, 16, 128, 12, 12, (3, 3), (1, 1), (1, 1), 1),
    (2, 5, 3, 1, 17, (1, 4), (1, 3), (1, 2), 1),  # a Conv1d as height 1
    (0, 3, 4, 5, 5, (3, 3), (1, 1), (1, 1), 1),
    (2, 10, 4, 11, 12, (3, 3), (2, 2), (1, 2), 2),  # 5 channels per group: the grouped backward
    (64, 1, 16, 28, 28, (5, 5), (1, 1), (1, 1), 1),  # the MNIST stem, in several chunks of samples
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_weight_equals_autograd(case, method, device):
    batch, channels, out_channels, height, width, kernel, stride, dilation, groups = case
    padded = torch.randn(batch, channels, height, width, dtype=torch.float64, device=device)
    out_h = (height - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    grad_output = torch.randn(batch, out_channels, out_h, out_w, dtype=torch.float64, device=device)
    result = op.conv2d_weight_sq_norm(padded, grad_output, list(kernel), list(stride), list(dilation), groups, method)
    expected = literal_conv_sq_norm(padded.cpu(), grad_output.cpu(), kernel, stride, dilation, groups)
    torch.testing.assert_close(result.cpu(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_conv2d_weight_reads_channels_last(method, device):
    padded = torch.randn(2, 8, 10, 10, dtype=torch.float64, device=device)
    grad_output = torch.randn(2, 16, 8, 8, dtype=torch.float64, device=device)
    args = ([3, 3], [1, 1], [1, 1], 2, method)
    expected = op.conv2d_weight_sq_norm(padded, grad_output, *args)
    result = op.conv2d_weight_sq_norm(padded.to(memory_format=torch.channels_last),
                                      grad_output.to(memory_format=torch.channels_last), *args)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=0)


@given(count=st.integers(1, 4), positions=st.integers(1, 12), in_features=st.integers(1, 12),
       out_features=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_ghost_equals_materialise(count, positions, in_features, out_features, seed):
    generator = torch.Generator().manual_seed(seed)
    activations = torch.randn(count, positions, in_features, generator=generator, dtype=torch.float64)
    grads = torch.randn(count, positions, out_features, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(op.outer_product_sq_norm(activations, grads, "ghost"),
                               op.outer_product_sq_norm(activations, grads, "materialise"), rtol=1e-12, atol=1e-12)


def test_outer_product_rejects_an_unknown_method():
    with pytest.raises(RuntimeError, match='method must be "ghost" or "materialise", got "gram"'):
        op.outer_product_sq_norm(torch.randn(2, 3, 4), torch.randn(2, 3, 5), "gram")


def test_outer_product_rejects_mismatched_positions():
    with pytest.raises(RuntimeError, match="must agree in N and T"):
        op.outer_product_sq_norm(torch.randn(2, 3, 4), torch.randn(2, 4, 5), "ghost")


def test_outer_product_rejects_mixed_dtypes():
    with pytest.raises(RuntimeError, match="must have one dtype"):
        op.outer_product_sq_norm(torch.randn(2, 3, 4), torch.randn(2, 3, 5, dtype=torch.float64), "ghost")


def test_outer_product_rejects_integer_inputs():
    with pytest.raises(RuntimeError, match="activations must be float32, float64, float16 or bfloat16"):
        op.outer_product_sq_norm(torch.ones(2, 3, 4, dtype=torch.int64), torch.ones(2, 3, 5, dtype=torch.int64), "ghost")


def test_conv2d_rejects_a_grad_output_of_the_wrong_size():
    with pytest.raises(RuntimeError, match="does not match the convolution of padded_input"):
        op.conv2d_weight_sq_norm(torch.randn(1, 3, 8, 8), torch.randn(1, 4, 7, 6), [3, 3], [1, 1], [1, 1], 1, "ghost")


def test_conv2d_rejects_groups_that_do_not_divide_the_channels():
    with pytest.raises(RuntimeError, match=r"groups \(2\) must divide C_in \(3\)"):
        op.conv2d_weight_sq_norm(torch.randn(1, 3, 8, 8), torch.randn(1, 4, 6, 6), [3, 3], [1, 1], [1, 1], 2, "ghost")


def test_backward_through_the_norms_raises():
    activations = torch.randn(2, 3, 4, requires_grad=True)
    result = op.outer_product_sq_norm(activations, torch.randn(2, 3, 5), "ghost")
    with pytest.raises(RuntimeError, match="not implemented"):
        result.sum().backward()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(method, dtype, device):
    activations = torch.randn(3, 6, 5, device=device).to(dtype)
    grads = torch.randn(3, 6, 4, device=device).to(dtype)
    torch.library.opcheck(op.outer_product_sq_norm.default, (activations, grads, method))
    padded = torch.randn(2, 4, 7, 7, device=device).to(dtype)
    grad_output = torch.randn(2, 6, 5, 5, device=device).to(dtype)
    torch.library.opcheck(op.conv2d_weight_sq_norm.default, (padded, grad_output, [3, 3], [1, 1], [1, 1], 2, method))


def test_compiles_without_graph_breaks():
    def norms(activations, grads):
        return op.outer_product_sq_norm(activations * 2, grads, "ghost").sqrt()

    activations, grads = torch.randn(3, 6, 5), torch.randn(3, 6, 4)
    compiled = torch.compile(norms, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(activations, grads), norms(activations, grads))


def literal_affine_grads(grad_output, inputs, shift, scale):
    normalised = (inputs.double() - (0 if shift is None else shift.double())) * scale.double()
    return (grad_output.double() * normalised).sum(2), grad_output.double().sum(2)


def _affine_inputs(batch, channels, positions, layout, device, dtype=torch.float64, seed=0):
    """grad_output, input [B, C, T] with positions adjacent ("channels_first") or
    channels adjacent ("channels_last", LayerNorm's layout); shift and scale as
    expanded per-channel (BatchNorm) or per-position (LayerNorm) statistics."""
    generator = torch.Generator().manual_seed(seed)

    def make():
        if layout != "channels_last":
            return torch.randn(batch, channels, positions, generator=generator, dtype=torch.float64)
        return torch.randn(batch, positions, channels, generator=generator, dtype=torch.float64).transpose(1, 2)

    grad_output, inputs = make(), make()
    if layout == "dense_statistics":  # no stride-0 dimension: the CPU kernel's general path
        shift = torch.randn(batch, channels, positions, generator=generator, dtype=torch.float64)
        scale = torch.rand(batch, channels, positions, generator=generator, dtype=torch.float64) + 0.5
    elif layout == "channels_first":
        shift = torch.randn(1, channels, 1, generator=generator, dtype=torch.float64)
        scale = torch.rand(1, channels, 1, generator=generator, dtype=torch.float64) + 0.5
    else:
        shift = torch.randn(batch, 1, positions, generator=generator, dtype=torch.float64)
        scale = torch.rand(batch, 1, positions, generator=generator, dtype=torch.float64) + 0.5
    tensors = [t.to(device=device, dtype=dtype) for t in (grad_output, inputs, shift, scale)]
    return tensors[0], tensors[1], tensors[2].expand_as(tensors[0]), tensors[3].expand_as(tensors[0])


# (2, 3, 700): several 256-position blocks; (2, 300, 9): several 256-channel blocks.
AFFINE_SHAPES = [(2, 3, 5), (1, 1, 1), (3, 40, 70), (2, 33, 1), (0, 4, 3), (2, 5, 0), (2, 3, 700), (2, 300, 9)]


@pytest.mark.parametrize("layout", ["channels_first", "channels_last", "dense_statistics"])
@pytest.mark.parametrize("shape", AFFINE_SHAPES, ids=str)
@pytest.mark.parametrize("centred", [True, False], ids=["shift", "no_shift"])
def test_norm_affine_grads_equal_the_formula(shape, layout, centred, device):
    grad_output, inputs, shift, scale = _affine_inputs(*shape, layout, device)
    shift = shift if centred else None
    weight, bias = op.norm_affine_grads(grad_output, inputs, shift, scale)
    expected_weight, expected_bias = literal_affine_grads(grad_output, inputs, shift, scale)
    torch.testing.assert_close(weight, expected_weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bias, expected_bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last", "dense_statistics"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_norm_affine_grads_accumulate_in_float32(dtype, layout, device):
    grad_output, inputs, shift, scale = _affine_inputs(3, 20, 600, layout, device, dtype)
    weight, bias = op.norm_affine_grads(grad_output, inputs, shift, scale)
    assert weight.dtype == bias.dtype == torch.float32
    expected_weight, expected_bias = literal_affine_grads(grad_output.float(), inputs.float(), shift.float(),
                                                          scale.float())
    torch.testing.assert_close(weight.double(), expected_weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.double(), expected_bias, rtol=1e-5, atol=1e-5)


def test_norm_affine_grads_reject_unexpanded_statistics():
    with pytest.raises(RuntimeError, match=r"shift must have grad_output's shape \[2, 3, 4\] \(expand"):
        op.norm_affine_grads(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(1, 3, 1), torch.ones(2, 3, 4))


def test_norm_affine_grads_reject_mixed_dtypes():
    with pytest.raises(RuntimeError, match="scale must have grad_output's dtype"):
        op.norm_affine_grads(torch.randn(2, 3, 4), torch.randn(2, 3, 4), None, torch.ones(2, 3, 4, dtype=torch.float64))


@pytest.mark.parametrize("centred", [True, False], ids=["shift", "no_shift"])
def test_opcheck_norm_affine_grads(centred, device):
    grad_output, inputs, shift, scale = _affine_inputs(3, 5, 7, "channels_last", device, torch.float32)
    torch.library.opcheck(op.norm_affine_grads.default, (grad_output, inputs, shift if centred else None, scale))
