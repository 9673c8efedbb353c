"""Python side of the compiled operators: fake kernels, input checks, wrappers.

Every `torch.ops.gradood.*` operator gets a fake (meta) kernel here so that
torch.compile, torch.export and FakeTensor tracing see its output shapes.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

import torch
import torch.autograd.forward_ad as forward_ad
from torch._C._functorch import TransformType
from torch._functorch import pyfunctorch

from gradood import (
    _autograd,
    _extension,  # noqa: F401  (registers torch.ops.gradood)
)
from gradood._C import _plain_cpu_score
from gradood._checks import check_features, check_kernel_dtype, check_logits, check_positive

#: Columns of `lastlayer_terms(...).terms`, read from the compiled library.
TERM_NAMES: tuple = tuple(torch.ops.gradood.lastlayer_term_names())
#: The first NUM_LOGIT_TERMS columns depend on the logits only.
NUM_LOGIT_TERMS: int = TERM_NAMES.index("feature_l1")
_TERM_INDEX = {name: index for index, name in enumerate(TERM_NAMES)}
_NO_FEATURE_TERM = -1
#: Whether this build of the extension has its CUDA kernels (setup.py: GRADOOD_WITH_CUDA).
HAS_CUDA_KERNELS: bool = torch._C._dispatch_has_kernel_for_dispatch_key("gradood::lastlayer_score", "CUDA")
_COMBINE = {"product": 0, "sum": 1}


def _terms_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_like(op: str, reference_name: str, reference: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    """As the compiled kernels check: every given tensor has the reference's dtype and device.
    A fake kernel runs for any meta input, so without this a CPU tensor beside a meta one
    got an uninitialised CPU result."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        torch._check(
            tensor.dtype == reference.dtype,
            lambda name=name, tensor=tensor: (
                f"{op}: {name} must have the dtype of {reference_name} ({reference.dtype}), got {tensor.dtype}"
            ),
        )
        torch._check(
            tensor.device == reference.device,
            lambda name=name, tensor=tensor: (
                f"{op}: {name} must be on the device of {reference_name} ({reference.device}), got {tensor.device}"
            ),
        )


@torch.library.register_fake("gradood::lastlayer_terms")
def _lastlayer_terms_fake(logits, features, temperature, clip):
    torch._check(logits.dim() == 2, lambda: f"lastlayer_terms: logits must be 2-D, got {logits.dim()}-D")
    if features is not None:
        torch._check(features.dim() == 2, lambda: f"lastlayer_terms: features must be 2-D, got {features.dim()}-D")
        torch._check(features.shape[0] == logits.shape[0], lambda: "lastlayer_terms: batch sizes differ")
    _check_like("lastlayer_terms", "logits", logits, features=features)
    batch = logits.shape[0]
    num_terms = len(TERM_NAMES) if features is not None else NUM_LOGIT_TERMS
    terms = logits.new_empty((batch, num_terms), dtype=_terms_dtype(logits.dtype))
    argmax = logits.new_empty((batch,), dtype=torch.int64)
    return terms, argmax


@torch.library.register_fake("gradood::lastlayer_score")
def _lastlayer_score_fake(
    logits, features, logit_term, logit_scale, feature_term, with_bias, combine, alpha, temperature, clip
):
    torch._check(logits.dim() == 2, lambda: f"lastlayer_score: logits must be 2-D, got {logits.dim()}-D")
    if features is not None:
        torch._check(features.dim() == 2, lambda: f"lastlayer_score: features must be 2-D, got {features.dim()}-D")
        torch._check(features.shape[0] == logits.shape[0], lambda: "lastlayer_score: batch sizes differ")
    _check_like("lastlayer_score", "logits", logits, features=features)
    return logits.new_empty((logits.shape[0],), dtype=_terms_dtype(logits.dtype))


@torch.library.register_fake("gradood::outer_product_sq_norm")
def _outer_product_sq_norm_fake(activations, grads, method):
    torch._check(
        activations.dim() == 3 and grads.dim() == 3,
        lambda: "outer_product_sq_norm: activations and grads must be 3-D [N, T, d] and [N, T, p]",
    )
    torch._check(
        activations.shape[:2] == grads.shape[:2],
        lambda: "outer_product_sq_norm: activations and grads must agree in N and T",
    )
    _check_like("outer_product_sq_norm", "activations", activations, grads=grads)
    return activations.new_empty((activations.shape[0],), dtype=_terms_dtype(activations.dtype))


@torch.library.register_fake("gradood::conv2d_weight_sq_norm")
def _conv2d_weight_sq_norm_fake(padded_input, grad_output, kernel_size, stride, dilation, groups, method):
    torch._check(
        padded_input.dim() == 4 and grad_output.dim() == 4,
        lambda: "conv2d_weight_sq_norm: padded_input and grad_output must be 4-D",
    )
    torch._check(padded_input.shape[0] == grad_output.shape[0], lambda: "conv2d_weight_sq_norm: batch sizes differ")
    _check_like("conv2d_weight_sq_norm", "padded_input", padded_input, grad_output=grad_output)
    return padded_input.new_empty((padded_input.shape[0],), dtype=_terms_dtype(padded_input.dtype))


@torch.library.register_fake("gradood::norm_affine_grads")
def _norm_affine_grads_fake(grad_output, input, shift, scale):
    torch._check(grad_output.dim() == 3, lambda: "norm_affine_grads: grad_output must be 3-D [B, C, T]")
    _check_like("norm_affine_grads", "grad_output", grad_output, input=input, shift=shift, scale=scale)
    shape = grad_output.shape[:2]
    dtype = _terms_dtype(grad_output.dtype)
    return grad_output.new_empty(shape, dtype=dtype), grad_output.new_empty(shape, dtype=dtype)


@torch.library.register_fake("gradood::react_energy")
def _react_energy_fake(features, weight, bias, clip):
    torch._check(features.dim() == 2 and weight.dim() == 2, lambda: "react_energy: features and weight must be 2-D")
    torch._check(
        weight.shape[1] == features.shape[1], lambda: "react_energy: weight must be [C, D] for features [B, D]"
    )
    _check_like("react_energy", "features", features, weight=weight, bias=bias)
    return features.new_empty((features.shape[0],), dtype=_terms_dtype(features.dtype))


@torch.library.register_fake("gradood::top_features")
def _top_features_fake(features, keep):
    torch._check(features.dim() == 2, lambda: "top_features: features must be 2-D [B, D]")
    torch._check(1 <= keep <= features.shape[1], lambda: "top_features: keep must be in [1, D]")
    batch = features.shape[0]
    return (
        features.new_empty((batch, keep)),
        features.new_empty((batch, keep), dtype=torch.int64),
        features.new_empty((batch,), dtype=torch.float64),
        features.new_empty((batch,), dtype=torch.float64),
    )


@torch.library.register_fake("gradood::pruned_linear")
def _pruned_linear_fake(values, indices, weight_blocks, classes):
    torch._check(values.dim() == 2 and indices.shape == values.shape, lambda: "pruned_linear: values, indices [B, K]")
    torch._check(
        weight_blocks.dim() == 3 and weight_blocks.shape[0] == -(-classes // PRUNED_LINEAR_BLOCK),
        lambda: "pruned_linear: weight_blocks must be [ceil(classes / 64), D, 64]",
    )
    _check_like("pruned_linear", "values", values, weight_blocks=weight_blocks)
    return values.new_empty((values.shape[0], classes))


#: Classes per block of pruned_linear's weight_blocks (csrc/ops/pruned_linear.h).
PRUNED_LINEAR_BLOCK = 64


def pruned_linear_blocks(weight: torch.Tensor) -> torch.Tensor:
    """A head W [C, D] laid out for `gradood::pruned_linear`: [ceil(C/64), D, 64], block n
    holding Wᵀ's columns 64n … 64n + 63 (zero beyond C), each block contiguous."""
    classes, count = weight.shape
    blocks = -(-classes // PRUNED_LINEAR_BLOCK)
    padded = torch.nn.functional.pad(weight, (0, 0, 0, blocks * PRUNED_LINEAR_BLOCK - classes))
    return padded.reshape(blocks, PRUNED_LINEAR_BLOCK, count).transpose(1, 2).contiguous()


def pruned_linear_sample_blocks(features: torch.Tensor) -> torch.Tensor:
    """Features v [B, D] laid out as `gradood::pruned_linear`'s weight_blocks with the roles of
    samples and classes swapped, for a sparse head [C, K] (each class's kept weights and their
    feature indices) applied as pruned_linear(head_values, head_indices, blocks, B) = (W' vᵀ)
    [C, B]: [ceil(B/64), D + 1, 64], block n holding samples 64n … 64n + 63 (zero beyond B), and
    row D zero, the index a class with fewer kept weights pads with (its padded products are
    exactly 0, whatever the features)."""
    batch, count = features.shape
    blocks = -(-batch // PRUNED_LINEAR_BLOCK)
    table = features.new_zeros((blocks, count + 1, PRUNED_LINEAR_BLOCK))
    padded = torch.nn.functional.pad(features, (0, 0, 0, blocks * PRUNED_LINEAR_BLOCK - batch))
    table[:, :count].copy_(padded.reshape(blocks, PRUNED_LINEAR_BLOCK, count).transpose(1, 2))
    return table


_autograd.register()


def refuse_unsupported_transforms(where: str, *tensors: Optional[torch.Tensor]) -> None:
    """The score operators have reverse-mode derivatives only (gradood/_autograd.py):
    forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) would lose the
    tangent silently, and torch.func.grad/jacrev cannot run a Python-registered backward.
    Both are refused with what to do instead; torch.func.vmap alone works."""
    if torch.compiler.is_compiling():
        return
    interpreters = pyfunctorch.retrieve_all_functorch_interpreters()
    if interpreters and any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in interpreters):
        raise RuntimeError(
            f"{where}: gradood's compiled score operators do not run under torch.func.grad, jacrev, jacfwd, "
            "jvp or hessian; differentiate the batch with torch.autograd.grad (the operators have exact "
            "reverse-mode derivatives), or use the pure-PyTorch gradood.reference version inside the transform"
        )
    if forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors
    ):
        raise RuntimeError(
            f"{where}: forward-mode AD (dual tensors) is not supported by gradood's compiled score operators "
            "(their tangent would be lost); use reverse mode (torch.autograd.grad), or the pure-PyTorch "
            "gradood.reference version"
        )


def _below_autograd(*tensors: Optional[torch.Tensor]):
    """A context that runs an operator below the Autograd dispatch key when no gradient
    can flow (grad mode off, or no input requiring grad): the Python-registered backward
    costs ~6 us a call to set up even then. Not while compiling (dynamo traces the
    plain call) or scripting."""
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    ):
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


def cpu_capability() -> str:
    """The instruction-set level of the CPU kernels in use: "DEFAULT", "AVX2" or "AVX512"
    (or "PORTABLE", forced). Chosen at the first call: GRADOOD_CPU_CAPABILITY=default|avx2|avx512
    forces one (the CPU must have it; on x86-64 also portable, the DEFAULT code without its
    SSE2 paths, which is what non-x86 CPUs run), otherwise torch's level (torch.backends.cpu.get_cpu_capability(),
    which ATEN_CPU_CAPABILITY sets), capped at what the CPU runs."""
    return torch.ops.gradood.cpu_capability()


def check_kernels_for(where: str, name: str, tensor: torch.Tensor) -> None:
    """Raises when `tensor` is on CUDA but this build has no CUDA kernels."""
    if tensor.is_cuda and not HAS_CUDA_KERNELS:
        raise RuntimeError(
            f"{where}: {name} are on {tensor.device}, but this build of gradood has no CUDA kernels; rebuild "
            "against a CUDA torch with nvcc available: GRADOOD_WITH_CUDA=1 pip install --no-build-isolation -e ."
        )


def _check_inputs(where: str, logits, features, temperature: float, clip: float) -> tuple:
    check_logits(where, logits)
    refuse_unsupported_transforms(where, logits, features)
    check_kernel_dtype(where, "logits", logits)
    check_kernels_for(where, "logits", logits)
    if features is not None:
        check_features(where, features, logits)
    return check_positive(where, "temperature", temperature), check_positive(where, "clip", clip, allow_inf=True)


class LastLayerTerms(NamedTuple):
    """Output of one pass of `lastlayer_terms`: `terms` [B, n] (columns
    TERM_NAMES, float32, or float64 for float64 inputs) and `argmax` [B]."""

    terms: torch.Tensor
    argmax: torch.Tensor

    def column(self, name: str) -> torch.Tensor:
        """The column called `name` (one of TERM_NAMES), shape [B]."""
        index = TERM_NAMES.index(name)
        if index >= self.terms.shape[1]:
            raise ValueError(f"lastlayer_terms: column {name!r} needs features, which were not given")
        return self.terms[:, index]


def lastlayer_terms(
    logits: torch.Tensor,
    features: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    clip: float = math.inf,
    where: str = "gradood.scores.lastlayer_terms",
) -> LastLayerTerms:
    """Every last-layer term of every row, from one pass over logits and features.

    Columns (TERM_NAMES), with p = softmax(f / T) and ŷ = argmax f:
        max_logit            max_j f_j
        energy               T · log Σ_j exp(f_j / T)
        max_softmax          p_ŷ
        uniform_deviation_l1 Σ_j |p_j - 1/C|
        gini                 Σ_j p_j (1 - p_j)
        onehot_deviation_l2  ‖p - e_ŷ‖_2
        feature_l1           ‖v‖_1            (only with features)
        feature_l2           ‖v‖_2            (only with features)
        feature_clipped_l1   Σ_i min(|v_i|, clip)  (only with features)

    A NaN logit makes its row's logit terms NaN (argmax points at the first
    NaN, as torch.max does); a NaN feature makes its row's feature terms NaN.
    Other rows are unaffected. -inf logits get probability 0.
    """
    temperature, clip = _check_inputs(where, logits, features, temperature, clip)
    with _below_autograd(logits, features):
        terms, argmax = torch.ops.gradood.lastlayer_terms(logits, features, temperature, clip)
    return LastLayerTerms(terms, argmax)


def plain_cpu_score(
    logits, features, logit_term: int, logit_scale, feature_term: int, with_bias, combine: int, alpha, temperature, clip
) -> Optional[torch.Tensor]:
    """lastlayer_score straight to the CPU kernel (csrc/python_fast_path.cpp) for plain CPU
    tensors with no gradient to flow and no mode, transform, tracer or autocast in play,
    the columns given by index; None for everything else, which `lastlayer_score` then
    checks and dispatches (its errors, modes and autograd are unchanged)."""
    if forward_ad._current_level >= 0 or torch.compiler.is_compiling():
        return None
    return _plain_cpu_score(
        logits, features, logit_term, logit_scale, feature_term, with_bias, combine, alpha, temperature, clip
    )


def lastlayer_score(
    where: str,
    logits: torch.Tensor,
    features: Optional[torch.Tensor],
    logit_term: str,
    logit_scale: float = 1.0,
    feature_term: Optional[str] = None,
    with_bias: bool = False,
    combine: str = "product",
    alpha: float = 0.0,
    temperature: float = 1.0,
    clip: float = math.inf,
) -> torch.Tensor:
    """One score per row from the same single pass, composed in the kernel:

        combine="product": logit_scale · U · V'     (U alone when feature_term is None)
        combine="sum":     logit_scale · U + alpha · V'

    U = column `logit_term`, V = column `feature_term` (TERM_NAMES), and V' = V
    or, with_bias, ‖[v, 1]‖ (feature_l1 + 1, sqrt(feature_l2² + 1)). `where`
    names the public function in error messages.
    """
    score = plain_cpu_score(
        logits,
        features,
        _TERM_INDEX.get(logit_term, -2),
        logit_scale,
        _NO_FEATURE_TERM if feature_term is None else _TERM_INDEX.get(feature_term, -2),
        with_bias,
        _COMBINE.get(combine, -1),
        alpha,
        temperature,
        clip,
    )
    if score is not None:
        return score
    temperature, clip = _check_inputs(where, logits, features, temperature, clip)
    if (
        logit_term == "max_logit"
        and feature_term is None
        and logit_scale == 1.0
        and not (logits.requires_grad and torch.is_grad_enabled())
        and not (logits.device.type == "cpu" and cpu_capability() == "DEFAULT" and logits.shape[1] > 32)
    ):
        # One read of the logits, nothing else: ATen's reduction is as fast as it gets, except
        # on long rows at the DEFAULT level, where the kernel's max pass (also one read) took
        # 68 us against 862 for amax (B = 1024, C = 1000); NaN rows stay NaN either way. Only
        # where no gradient flows: amax's backward splits ties (and is NaN on NaN rows), the
        # operator's is the documented one-hot at the first argmax, on every level and device.
        return logits.amax(dim=1).to(_terms_dtype(logits.dtype))
    feature_index = _NO_FEATURE_TERM if feature_term is None else TERM_NAMES.index(feature_term)
    with _below_autograd(logits, features):
        return torch.ops.gradood.lastlayer_score(
            logits,
            features,
            TERM_NAMES.index(logit_term),
            float(logit_scale),
            feature_index,
            bool(with_bias),
            _COMBINE[combine],
            float(alpha),
            temperature,
            clip,
        )
