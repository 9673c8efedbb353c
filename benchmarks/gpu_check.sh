#!/usr/bin/env bash
# Everything a GPU session checks, in one device run (device tool, from the repo
# root): build with the CUDA kernels, the whole test suite (CUDA cases
# included), compute-sanitizer memcheck over the CUDA op tests, and the
# last-layer benchmark with its summary. Results land in $OUT.
#
#   run: bash benchmarks/gpu_check.sh [STAGE...]   (OUT is set by the device tool)
#
# STAGE: tests, sanitizer, bench, persample, lowdim (default: all five). Every call builds
# first (incrementally on a warm machine), so a 10-minute device call can take one
# stage at a time: `bash benchmarks/gpu_check.sh tests`, then `... sanitizer bench`, then
# `... persample`, then `... lowdim`.
set -uo pipefail
stages="${*:-tests sanitizer bench persample lowdim}"
wants() { case " $stages " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
OUT="${OUT:-$(mktemp -d)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" GRADOOD_WITH_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
status=0
step() { echo "== $1 =="; }

step "device"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/device.txt"

step "build"
if ! python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; exit 1
fi
python3 -c "import torch, gradood; print('CUDA kernels registered:', torch._C._dispatch_has_kernel_for_dispatch_key('gradood::lastlayer_score', 'CUDA'))" | tee -a "$OUT/device.txt"

if wants tests; then
  step "tests"
  python3 -m pytest tests -q -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/tests.txt" || status=1
fi

if wants sanitizer; then
  step "compute-sanitizer memcheck (CUDA op tests)"
  compute-sanitizer --tool memcheck --error-exitcode 99 \
    python3 -m pytest tests/test_scores.py tests/test_ops.py tests/test_persample_ops.py tests/test_react_energy.py \
    -q -p no:cacheprovider \
    -k "cuda and not arbitrary" \
    2>&1 | tail -15 | tee "$OUT/memcheck.txt" || status=1
fi

if wants bench; then
  step "benchmark"
  python3 -m pytest benchmarks/test_lastlayer_scores.py -q -p no:cacheprovider -k "cuda" \
    --benchmark-json="$OUT/bench.json" >"$OUT/bench.log" 2>&1 || status=1
  tail -3 "$OUT/bench.log"
  python3 benchmarks/summarize.py "$OUT/bench.json" | tee "$OUT/summary.md"

  step "ReAct: react_energy vs eager and compiled reference vs the GEMM alone"
  python3 -m pytest benchmarks/test_react.py -q -p no:cacheprovider -k "cuda" \
    --benchmark-json="$OUT/react.json" >"$OUT/react.log" 2>&1 || status=1
  python3 benchmarks/summarize.py "$OUT/react.json" | tee "$OUT/react_summary.md"

  step "last-layer kernel: a warp per row against a block per row, at the bandwidth target size"
  for threads in 32 256; do
    GRADOOD_LASTLAYER_ROW_THREADS=$threads python3 -m pytest benchmarks/test_lastlayer_scores.py -q \
      -p no:cacheprovider -k "cuda and B8192 and C1000 and (gradood or copy)" \
      --benchmark-columns=median,iqr --benchmark-json="$OUT/bench_row_threads_$threads.json" 2>&1 \
      | grep -E "^test_" | tee "$OUT/bench_row_threads_$threads.txt" || status=1
  done
fi

if wants persample; then
  step "per-sample engine: ResNet-18 CIFAR B=256, ResNet-50 and ViT-B/16 at 224, B=64; time and peak memory"
  (cd benchmarks && python3 -m pytest test_persample.py -q -rs -p no:cacheprovider -k cuda \
    --benchmark-json="$OUT/persample.json" >"$OUT/persample.log" 2>&1) || status=1
  grep -E "passed|failed|SKIPPED" "$OUT/persample.log" | tail -12
  python3 benchmarks/summarize.py "$OUT/persample.json" | tee "$OUT/persample_summary.md"
fi

if wants lowdim; then
  step "LowDimGrad projection benchmark (ResNet-18 CIFAR, K=200)"
  (cd benchmarks && python3 -m pytest test_lowdim.py -q -p no:cacheprovider -k cuda \
    --benchmark-json="$OUT/lowdim.json" >"$OUT/lowdim.log" 2>&1) || status=1
  tail -15 "$OUT/lowdim.log"
  (cd benchmarks && python3 profile_lowdim.py --device cuda --batch 128 && \
    python3 profile_lowdim.py --device cuda --batch 128 --last-stage) 2>&1 | tee "$OUT/lowdim_profile.txt" || status=1
fi
exit $status
