#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with nvcc (-c; no GPU and no CUDA torch needed)
# so CUDA code never rots on machines without a GPU. Skipped, saying why, only
# where nvcc is absent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc_bin="$(command -v nvcc || true)"
if [ -z "$nvcc_bin" ] && [ -x /usr/local/cuda/bin/nvcc ]; then nvcc_bin=/usr/local/cuda/bin/nvcc; fi
if [ -z "$nvcc_bin" ]; then
  echo "check_cuda_compile: SKIPPED: nvcc not found on PATH or in /usr/local/cuda/bin"
  exit 0
fi
arch="${GRADOOD_NVCC_ARCH:-arch=compute_90,code=sm_90}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
status=0
for source in "$root"/csrc/cuda/*.cu; do
  [ -e "$source" ] || continue
  if "$nvcc_bin" -std=c++17 -O3 -Werror all-warnings -gencode "$arch" -I"$root/csrc" \
      -c "$source" -o "$out/$(basename "$source").o"; then
    echo "check_cuda_compile: ok $(basename "$source")"
  else
    echo "check_cuda_compile: FAILED $(basename "$source")"
    status=1
  fi
done
exit $status
