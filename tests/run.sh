#!/usr/bin/env bash
# Installs everything gradood needs into the active Python environment, builds
# it, and runs the whole test suite: the CUDA compile check, the emulated CUDA
# kernels under AddressSanitizer, the C++ (libtorch) test program and pytest.
# The README's test command and .ci/run both run this.
# Extra arguments are passed to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# torch first: a CUDA machine keeps its own torch; elsewhere the local CPU wheel.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install "torch==2.13.0"
fi
python -m pip install --upgrade pip
python -m pip install "setuptools>=77" wheel ninja numpy pytest pytest-benchmark hypothesis
# The model zoos the interface tests build models from (random weights, no download).
# timm and torchvision without their dependencies: pip would otherwise replace a CPU
# torch by the CUDA build. On the test machines this torchvision wheel is built for a
# CUDA torch; gradood.testing.import_torchvision loads its Python side without its
# compiled operators (users have a torchvision matching their torch).
python -m pip install "transformers==5.24.0" huggingface_hub safetensors pyyaml pillow
python -m pip install --no-deps "timm==1.0.31" "torchvision==0.28.0"
# No build isolation: an isolated build would fetch another torch (setup.py says why).
python -m pip install --no-build-isolation -e ".[demo,serving,test,docs,dev,onnx]"

echo "== habits: ruff (lint, format), mypy, clang-format =="
ruff check gradood
ruff format --check gradood
mypy
find csrc tests/cpp examples/cpp \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.inc' \) -print0 |
  xargs -0 clang-format --dry-run --Werror
echo "== docs: mkdocs build, warnings as errors =="
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$(mktemp -d)/site"
echo "== the wheel: sdist, wheel, fresh venv, smoke test outside the checkout =="
bash tests/check_wheel.sh
echo "== CPU instruction-set levels stay in their kernels =="
bash tests/check_cpu_level_isolation.sh
echo "== CUDA compile check =="
bash tests/check_cuda_compile.sh
bash tests/check_cuda_registration.sh
echo "== CUDA kernels on the CPU emulation, with AddressSanitizer =="
bash tests/run_emulated_asan.sh
echo "== C++ (libtorch) build and test =="
bash tests/cpp/run.sh
echo "== pytest =="
python -m pytest tests "$@"
