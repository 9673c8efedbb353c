#!/usr/bin/env bash
# Runs the emulated CUDA kernels (tests/test_cuda_emulated.py) with
# AddressSanitizer: the kernels' every read and write of the (CPU) tensors is
# bounds-checked. Skipped, saying why, where g++ has no libasan.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
libasan="$(g++ -print-file-name=libasan.so 2>/dev/null || true)"
if [ -z "$libasan" ] || [ ! -e "$libasan" ]; then
  echo "run_emulated_asan: SKIPPED: g++ has no libasan.so"
  exit 0
fi
# -s: an ASan report ends the process, so pytest must not capture it.
GRADOOD_EMULATION_SANITIZE=1 ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD="$libasan" \
  python -m pytest "$root/tests/test_cuda_emulated.py" -q -s -p no:cacheprovider "$@"
