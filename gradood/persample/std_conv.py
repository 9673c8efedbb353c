"""Weight-standardised convolutions: timm's StdConv2d and StdConv2dSame (BiT,
ViT-hybrid), ScaledStdConv2d and ScaledStdConv2dSame (NFNets), and transformers'
WeightStandardizedConv2d (Hugging Face BiT and ViT-hybrid; the same
standardisation, after its optional dynamic 'SAME' padding module `pad`).
Matched by qualified name, so gradood imports neither library.

The forward convolves with W = c ⊙ ŵ, where per output channel o, over its
N = C_in/groups · kh · kw weights,

    ŵ_o = (w_o − mean(w_o)) / σ_o,   σ_o = sqrt(var(w_o) + eps)   (biased variance)

and c_o = 1 (StdConv) or gain_o · γ/√N (ScaledStdConv). With G the per-sample
gradient w.r.t. W (the convolution's), the gradient w.r.t. the raw weight is the
standardisation's Jacobian applied to c ⊙ G:

    ∂ℓ/∂w_o = (1/σ_o) (H_o − (s₁/N) 1 − (s₂/N) ŵ_o),   H_o = c_o G_o,
    s₁ = Σ_j H_oj,   s₂ = ⟨H_o, ŵ_o⟩

so, as Σ_j ŵ_oj = 0 and ‖ŵ_o‖² = N r_o with r_o = var/(var + eps),

    ‖∂ℓ/∂w_o‖² = (1/σ_o²) (‖H_o‖² − s₁²/N − (2 − r_o) s₂²/N).

Σ_o ‖H_o‖²/σ_o² is the convolution's weight norm with the output gradient scaled
by c_o/σ_o per channel (gradood::conv2d_weight_sq_norm, ghost or materialise);
s₁ = c_o Σ_t g_ot (sum of patch t) comes from a convolution of the input with
ones, s₂ = c_o Σ_t g_ot (ŵ ∗ x)_ot from one with ŵ. No per-sample gradient is
formed. The gain's gradient is ∂ℓ/∂gain_o = (γ/√N) ⟨G_o, ŵ_o⟩, the bias's Σ_t g_t.
"""

from __future__ import annotations

import typing

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from gradood.persample._grads import DenseLayerGradients, register_grad_rule
from gradood.persample._rules import RuleResult, prefers_ghost, register_rule
from gradood.persample.conv import _as_conv2d, _padded, conv_grads

_PREFIX = "timm.layers.std_conv."
STD_CONVS = tuple(
    _PREFIX + name for name in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")
) + ("transformers.models.bit.modeling_bit.WeightStandardizedConv2d",)


def _same_padded(module: _ConvNd, inputs: torch.Tensor) -> torch.Tensor:
    """The *Same classes pad dynamically (TF 'SAME') before their static padding;
    transformers' class with its `pad` module where it has one."""
    pad = getattr(module, "pad", None)
    if isinstance(pad, nn.Module):
        return pad(inputs)
    if getattr(module, "same_pad", False):
        from timm.layers.padding import pad_same  # the class is timm's, so timm is loaded

        return pad_same(inputs, list(module.kernel_size), list(module.stride), list(module.dilation))
    return inputs


def _standardised(module: _ConvNd, dtype: torch.dtype):
    """(ŵ [C_out, N], σ [C_out], r [C_out], c [C_out], γ/√N or None)."""
    weight = module.weight.detach().to(dtype).reshape(module.out_channels, -1)
    variance, mean = torch.var_mean(weight, 1, unbiased=False)
    sigma = torch.sqrt(variance + float(typing.cast(float, module.eps)))
    w_hat = (weight - mean[:, None]) / sigma[:, None]
    gain = getattr(module, "gain", None)
    if gain is None:
        return w_hat, sigma, variance / sigma.square(), torch.ones_like(sigma), None
    scale = float(typing.cast(float, module.scale))
    return w_hat, sigma, variance / sigma.square(), gain.detach().to(dtype).reshape(-1) * scale, scale


def _channel_sums(module: _ConvNd, padded: torch.Tensor, grad_output: torch.Tensor, w_hat: torch.Tensor):
    """Per sample and output channel: Σ_t g_ot · (sum of patch t) and Σ_t g_ot (ŵ ∗ x)_ot."""
    kernel = module.weight.shape[1:]
    conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
    ones = padded.new_ones(module.groups, *kernel)
    patch_sums = conv(padded, ones, stride=module.stride, dilation=module.dilation, groups=module.groups)
    patch_sums = patch_sums.repeat_interleave(module.out_channels // module.groups, dim=1)
    responses = conv(
        padded,
        w_hat.reshape(module.weight.shape).to(padded.dtype),
        stride=module.stride,
        dilation=module.dilation,
        groups=module.groups,
    )
    spatial = tuple(range(2, grad_output.dim()))
    return (grad_output * patch_sums).sum(spatial), (grad_output * responses).sum(spatial)


@register_rule(*STD_CONVS)
def std_conv_rule(module: _ConvNd, inputs: torch.Tensor, grad_output: torch.Tensor) -> RuleResult:
    """‖∂ℓ/∂w‖², ‖∂ℓ/∂gain‖², ‖∂ℓ/∂b‖² per sample (closed form, module docstring)."""
    dtype = grad_output.dtype
    w_hat, sigma, ratio, channel_scale, gain_scale = _standardised(module, dtype)
    padded = _padded(module, _same_padded(module, inputs))
    padded2d, grads2d, kernel, stride, dilation = _as_conv2d(module, padded, grad_output)
    positions = grads2d.shape[2] * grads2d.shape[3]
    fan_in = w_hat.shape[1]
    ghost = prefers_ghost(positions, fan_in, module.out_channels // module.groups)
    method = "ghost" if ghost else "materialise"
    scaled = grads2d * (channel_scale / sigma).reshape(1, -1, 1, 1).to(grads2d.dtype)
    first = torch.ops.gradood.conv2d_weight_sq_norm(
        padded2d, scaled, list(kernel), list(stride), list(dilation), module.groups, method
    ).to(dtype)
    patch, response = _channel_sums(module, padded, grad_output, w_hat)
    s1, s2 = channel_scale * patch, channel_scale * response
    correction = (s1.square() + (2 - ratio) * s2.square()) / (fan_in * sigma.square())
    squared = {"weight": (first - correction.sum(1)).clamp_min(0)}
    if gain_scale is not None:
        squared["gain"] = (gain_scale * response).square().sum(1)
    if module.bias is not None:
        squared["bias"] = grad_output.reshape(grad_output.shape[0], grad_output.shape[1], -1).sum(2).square().sum(1)
    return RuleResult(squared, method)


std_conv_rule.parameters = ("weight", "bias", "gain")  # the parameters the rule knows


@register_grad_rule(*STD_CONVS)
def std_conv_grads(module: _ConvNd, inputs: torch.Tensor, grad_output: torch.Tensor) -> DenseLayerGradients:
    """The convolution's per-sample gradient G (per chunk), mapped through the
    standardisation: ∂ℓ/∂w_o = (c_o/σ_o)(G_o − mean(G_o) − ŵ_o mean(G_o ⊙ ŵ_o));
    the gain's (γ/√N)⟨G_o, ŵ_o⟩."""
    padded = _same_padded(module, inputs)
    plain = conv_grads(module, padded, grad_output)  # G w.r.t. the convolved weight, and the bias
    numels = {"weight": module.weight.numel()}
    gain = getattr(module, "gain", None)
    if gain is not None:
        numels["gain"] = gain.numel()
    if module.bias is not None:
        numels["bias"] = module.bias.numel()

    def materialise(start: int, end: int):
        chunk = plain._materialise(start, end)
        grads = chunk["weight"].reshape(end - start, module.out_channels, -1)
        w_hat, sigma, _, channel_scale, gain_scale = _standardised(module, grads.dtype)
        along = (grads * w_hat).mean(2, keepdim=True)
        raw = (grads - grads.mean(2, keepdim=True) - w_hat * along) * (channel_scale / sigma)[None, :, None]
        out = {"weight": raw.reshape(end - start, -1)}
        if "gain" in numels:
            out["gain"] = gain_scale * (grads * w_hat).sum(2)
        if "bias" in numels:
            out["bias"] = chunk["bias"]
        return out

    return DenseLayerGradients(inputs.shape[0], numels, materialise, per_sample_cost=plain._per_sample_cost)
