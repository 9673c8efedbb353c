"""Build of gradood and its operator library gradood._C.

Install against an already installed torch (>= 2.4), without build isolation:

    pip install --no-build-isolation -e .     # or: pip install --no-build-isolation .

Build isolation is off on purpose: an isolated build would install a fresh
torch from the registry into a temporary environment (a multi-GB CUDA build
where a CPU one is wanted) and compile against it instead of the torch you
run, which breaks the extension's ABI.

Environment:
    GRADOOD_WITH_CUDA=1|0   force the CUDA kernels on or off (default: on when
                            the installed torch has CUDA and nvcc is found)
    TORCH_CUDA_ARCH_LIST    GPU architectures to build for (torch's variable,
                            e.g. "9.0" for H100/H200)
    MAX_JOBS                parallel compile jobs (torch's variable)
"""

from __future__ import annotations

import glob
import os
import platform
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - an install-time message
    sys.exit(
        "gradood builds against an installed torch: install torch first "
        "(e.g. `pip install torch==2.13.0`), then "
        "`pip install --no-build-isolation .`"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _want_cuda() -> bool:
    forced = os.environ.get("GRADOOD_WITH_CUDA", "").strip().lower()
    torch_has_cuda = torch.version.cuda is not None
    nvcc_found = cpp_extension.CUDA_HOME is not None
    if forced in ("1", "true", "on", "yes"):
        if not (torch_has_cuda and nvcc_found):
            sys.exit(
                "GRADOOD_WITH_CUDA=1 but the CUDA kernels cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, "
                f"CUDA_HOME={cpp_extension.CUDA_HOME!r}"
            )
        return True
    if forced in ("0", "false", "off", "no"):
        return False
    if forced:
        sys.exit(f"GRADOOD_WITH_CUDA must be 1 or 0, got {forced!r}")
    return torch_has_cuda and nvcc_found


def _sources(with_cuda: bool) -> list[str]:
    patterns = ["*.cpp", "ops/*.cpp", "cpu/*.cpp"]
    if with_cuda:
        patterns += ["cuda/*.cu", "cuda/*.cpp"]
    found = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join(CSRC, pattern)))
    return [os.path.relpath(path, ROOT) for path in found]


# The CPU row kernels, compiled once per instruction-set level with the flags ATen's
# own build uses for its kernels (csrc/cpu/lastlayer_rows.h picks one at run time).
_X86 = platform.machine().lower() in ("x86_64", "amd64")
_LEVELS = [("DEFAULT", [])] + ([("PORTABLE", []), ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
                               ("AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"])]
                              if _X86 and sys.platform != "win32" else [])


class _BuildWithLevels(cpp_extension.BuildExtension):
    """BuildExtension, plus the per-level objects of the CPU row kernels (per-file flags,
    which setuptools has no place for), linked after the other objects so that any
    inline function they share with them is taken from the baseline build."""

    def build_extension(self, ext):
        flags = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
        objects = []
        for level, level_flags in _LEVELS:
            source = os.path.join("csrc", "cpu", "capability", f"lastlayer_rows_{level}.cpp")
            objects += self.compiler.compile(
                [source], output_dir=self.build_temp, include_dirs=ext.include_dirs,
                macros=[(name, value) for name, value in ext.define_macros],
                extra_postargs={"cxx": list(flags) + level_flags, "nvcc": []}, depends=ext.depends)
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def _extension():
    with_cuda = _want_cuda()
    openmp = "OpenMP" in torch.__config__.parallel_info()
    # -fopenmp-simd: the vectorised row kernels use `omp simd` reductions.
    cxx_flags = ["-O3", "-fvisibility=hidden", "-fopenmp-simd"]
    # at::parallel_for is an inline OpenMP loop in torch's headers: without
    # -fopenmp it silently runs on one thread.
    if openmp and sys.platform != "win32":
        cxx_flags.append("-fopenmp")
    kwargs = dict(
        name="gradood._C",
        sources=_sources(with_cuda),
        include_dirs=[CSRC],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
    )
    print(f"gradood: building {'with' if with_cuda else 'without'} CUDA kernels")
    if with_cuda:
        kwargs["define_macros"] = [("GRADOOD_WITH_CUDA", "1")]
        return cpp_extension.CUDAExtension(**kwargs)
    return cpp_extension.CppExtension(**kwargs)


# Metadata, dependencies and the `gradood` command: pyproject.toml. Here: the extension only.
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildWithLevels},
    zip_safe=False,
)
