"""The CUDA kernels of csrc/cuda, built for the CPU emulation of the CUDA
execution model (csrc/emulation/cuda_emulation.h) and called through ctypes on
CPU tensors, with the same layouts the CUDA registration passes them.

This checks the kernels' indexing, tiling, bounds, reductions and launch
configurations on machines without a GPU; timing and the device's memory model
need the GPU itself (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
GHOST, MATERIALISE = 0, 1


def _cuda_include() -> Optional[Path]:
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cuda_runtime.h").exists():
            return Path(candidate) / "include"
    return None


def unavailable_reason() -> Optional[str]:
    """Why the emulated kernels cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "g++ not found"
    if _cuda_include() is None:
        return "CUDA headers (cuda_runtime.h) not found"
    return None


def _sources() -> Sequence[Path]:
    return sorted(CSRC.glob("cuda/*.cu")) + [CSRC / "emulation" / "exports.cpp"]


def build(directory: Optional[Path] = None) -> ctypes.CDLL:
    """Compiles the kernels and the exports with g++ (cached by source hash)."""
    digest = hashlib.sha256()
    headers = sorted(CSRC.glob("**/*.h"))
    for path in list(_sources()) + headers:
        digest.update(path.read_bytes())
    sanitize = os.environ.get("GRADOOD_EMULATION_SANITIZE") == "1"
    digest.update(b"asan" if sanitize else b"")
    directory = Path(directory or Path(tempfile.gettempdir()) / "gradood_cuda_emulation")
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"kernels_{digest.hexdigest()[:16]}.so"
    if not library.exists():
        flags = ["-std=c++20", "-O1", "-g", "-fPIC", "-pthread", "-DGRADOOD_CUDA_EMULATION",
                 "-DGRADOOD_MAX_GRID_Y=3",  # so small problems take the grid-stride loops
                 f"-I{CSRC}", f"-I{_cuda_include()}", "-Wall", "-Wno-unknown-pragmas", "-Werror"]
        if sanitize:  # run with LD_PRELOAD=$(g++ -print-file-name=libasan.so) (tests/run_emulated_asan.sh)
            flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        objects = []
        for source in _sources():
            obj = directory / f"{source.name}.{digest.hexdigest()[:16]}.o"
            language = ["-x", "c++"] if source.suffix == ".cu" else []
            subprocess.run(["g++", *flags, *language, "-c", str(source), "-o", str(obj)], check=True)
            objects.append(str(obj))
        partial = directory / f"{library.name}.{os.getpid()}.tmp"
        subprocess.run(["g++", "-shared", "-pthread", *objects, *(["-fsanitize=address"] if sanitize else []),
                        "-o", str(partial)], check=True)
        os.replace(partial, library)
    lib = ctypes.CDLL(str(library))
    lib.gradood_emu_sq_norm_workspace_size.restype = ctypes.c_int64
    lib.gradood_emu_sq_norm_workspace_size.argtypes = [ctypes.c_int] + [ctypes.c_int64] * 4
    pointer, layout = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    for name in ("gradood_emu_outer_product_sq_norm", "gradood_emu_conv2d_weight_sq_norm"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = [ctypes.c_int, pointer, layout, pointer, layout, ctypes.c_int64,
                                       ctypes.c_int, pointer, pointer]
    lib.gradood_emu_norm_affine_grads.restype = ctypes.c_int
    lib.gradood_emu_norm_affine_grads.argtypes = [ctypes.c_int, pointer, layout, pointer, layout, pointer, layout,
                                                  pointer, layout, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                                  pointer, pointer]
    lib.gradood_emu_lastlayer_terms.restype = ctypes.c_int
    lib.gradood_emu_lastlayer_terms.argtypes = [ctypes.c_int, pointer, pointer, ctypes.c_int64, ctypes.c_int64,
                                                ctypes.c_int64, ctypes.c_double, ctypes.c_double, pointer,
                                                pointer]
    return lib


def _layout(values: Sequence[int]):
    return (ctypes.c_int64 * len(values))(*[int(v) for v in values])


def _ptr(tensor: Optional[torch.Tensor]):
    return ctypes.c_void_p(tensor.data_ptr() if tensor is not None else None)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_layout(rows: torch.Tensor, groups: int = 1):
    """[B·groups, T, k] (any strides; the groups of a sample adjacent along dim 0)
    as the kernels' DenseRows: groups, rows, columns, then the strides of a
    sample, a group, a row and a column."""
    return [groups, rows.shape[1], rows.shape[2], rows.stride(0) * groups, rows.stride(0), rows.stride(1),
            rows.stride(2)]


def outer_product_sq_norm(lib, activations: torch.Tensor, grads: torch.Tensor, method: int,
                          groups: int = 1) -> torch.Tensor:
    """Per-sample Σ over its groups of ‖Σ_t g_t a_tᵀ‖² for [B·groups, T, d] and
    [B·groups, T, p]; [B] in the accumulator dtype."""
    batch = activations.shape[0] // groups
    acc = _accumulator(activations.dtype)
    size = lib.gradood_emu_sq_norm_workspace_size(method, activations.shape[0], activations.shape[1],
                                                  activations.shape[2], grads.shape[2])
    workspace = torch.full((max(size, 1),), float("nan"), dtype=acc)
    out = torch.full((batch,), float("nan"), dtype=acc)
    status = lib.gradood_emu_outer_product_sq_norm(
        _DTYPE_CODES[activations.dtype], _ptr(activations), _layout(dense_layout(activations, groups)),
        _ptr(grads), _layout(dense_layout(grads, groups)), batch, method, _ptr(workspace), _ptr(out))
    if status != 0:
        raise RuntimeError(f"emulated launch failed with cudaError {status}")
    return out


def conv2d_weight_sq_norm(lib, padded: torch.Tensor, grad_output: torch.Tensor, kernel_size, stride, dilation,
                          groups: int, method: int) -> torch.Tensor:
    """Per-sample ‖∇_W‖² of a 2-D convolution from its padded input [B, C, H, W]
    and output gradient [B, C_out, H_o, W_o] (any strides: the positions of
    grad_output must flatten to one stride, as for a contiguous or channels-last
    tensor)."""
    batch, channels = padded.shape[:2]
    out_h, out_w = grad_output.shape[2:]
    grads = grad_output.flatten(2)  # [B, C_out, T]
    per_group = grad_output.shape[1] // groups
    grad_layout = [groups, out_h * out_w, per_group, grads.stride(0), grads.stride(1) * per_group,
                   grads.stride(2), grads.stride(1)]
    patch_layout = [groups, channels // groups, *padded.stride(), *kernel_size, *stride, *dilation, out_h, out_w]
    acc = _accumulator(padded.dtype)
    columns = channels // groups * kernel_size[0] * kernel_size[1]
    size = lib.gradood_emu_sq_norm_workspace_size(method, batch * groups, out_h * out_w, columns, per_group)
    workspace = torch.full((max(size, 1),), float("nan"), dtype=acc)
    out = torch.full((batch,), float("nan"), dtype=acc)
    status = lib.gradood_emu_conv2d_weight_sq_norm(
        _DTYPE_CODES[padded.dtype], _ptr(padded), _layout(patch_layout), _ptr(grads), _layout(grad_layout),
        batch, method, _ptr(workspace), _ptr(out))
    if status != 0:
        raise RuntimeError(f"emulated launch failed with cudaError {status}")
    return out


def norm_affine_grads(lib, grad_output: torch.Tensor, inputs: torch.Tensor, shift: Optional[torch.Tensor],
                      scale: torch.Tensor):
    """The norm_affine_grads kernel on [B, C, T] views (any strides): (weight, bias) [B, C]."""
    acc = _accumulator(grad_output.dtype)
    weight = torch.full(grad_output.shape[:2], float("nan"), dtype=acc)
    bias = torch.full(grad_output.shape[:2], float("nan"), dtype=acc)
    status = lib.gradood_emu_norm_affine_grads(
        _DTYPE_CODES[grad_output.dtype], _ptr(grad_output), _layout(grad_output.stride()), _ptr(inputs),
        _layout(inputs.stride()), _ptr(shift), _layout(shift.stride() if shift is not None else (0, 0, 0)),
        _ptr(scale), _layout(scale.stride()), *grad_output.shape, _ptr(weight), _ptr(bias))
    if status != 0:
        raise RuntimeError(f"emulated launch failed with cudaError {status}")
    return weight, bias


def lastlayer_terms(lib, logits: torch.Tensor, features: Optional[torch.Tensor], temperature: float,
                    clip: float):
    """The CUDA lastlayer_terms kernel on contiguous CPU inputs: (terms, argmax)."""
    batch, classes = logits.shape
    columns = 9 if features is not None else 6
    terms = torch.full((batch, columns), float("nan"), dtype=_accumulator(logits.dtype))
    argmax = torch.full((batch,), -1, dtype=torch.int64)
    status = lib.gradood_emu_lastlayer_terms(
        _DTYPE_CODES[logits.dtype], _ptr(logits), _ptr(features), batch, classes,
        features.shape[1] if features is not None else 0, temperature, clip, _ptr(terms), _ptr(argmax))
    if status != 0:
        raise RuntimeError(f"emulated launch failed with cudaError {status}")
    return terms, argmax
