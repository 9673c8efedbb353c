#!/usr/bin/env bash
# Type-checks the CUDA registration files (csrc/cuda/*_cuda.cpp) with g++
# against the installed (CPU) torch, with stand-ins for the few c10/cuda
# headers a CPU torch lacks (tests/cuda_standin). Nothing is linked or run:
# this only keeps the files compiling where no CUDA torch is installed. A GPU
# machine builds them for real (setup.py with GRADOOD_WITH_CUDA=1).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cuda_include=""
for candidate in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")"; do
  if [ -n "$candidate" ] && [ -e "$candidate/include/cuda_runtime.h" ]; then cuda_include="$candidate/include"; break; fi
done
if [ -z "$cuda_include" ]; then
  echo "check_cuda_registration: SKIPPED: CUDA headers not found"
  exit 0
fi
mapfile -t torch_includes < <(python -c "from torch.utils import cpp_extension; print('\n'.join(cpp_extension.include_paths()))")
flags=(-std=c++17 -fsyntax-only -Wall -Werror -I"$root/tests/cuda_standin" -I"$root/csrc" -I"$cuda_include")
for include in "${torch_includes[@]}"; do flags+=(-isystem "$include"); done
status=0
for source in "$root"/csrc/cuda/*_cuda.cpp; do
  if g++ "${flags[@]}" "$source"; then
    echo "check_cuda_registration: ok $(basename "$source")"
  else
    echo "check_cuda_registration: FAILED $(basename "$source")"
    status=1
  fi
done
exit $status
