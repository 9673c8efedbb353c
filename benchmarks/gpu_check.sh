#!/usr/bin/env bash
# The GPU check: one device call (device tool, from the repo root, bare checkout) that
# finishes within GPU_CHECK_SECONDS (default 540 s: 9 minutes, build included) and writes
# each stage's results to $OUT as soon as the stage ends, so a run cut off by the device's
# limit still returns what it measured.
#
#   run: bash benchmarks/gpu_check.sh            # the default stages, in priority order
#   run: bash benchmarks/gpu_check.sh full        # the default stages, then the long ones
#   run: bash benchmarks/gpu_check.sh STAGE...    # chosen stages (the build always runs)
#
# Default stages, in priority order (each skipped, with a line saying so, when the time
# left is below its floor):
#   tests      the CUDA cases of the unit tests (pytest -k cuda)
#   sanitizer  compute-sanitizer memcheck over the CUDA op tests
#   bandwidth  last-layer scores at B=8192, C=1000, D=2048 against the copy (the bandwidth target)
#   resnet50   the per-sample engine on ResNet-50, 224², B=64, against a training step
# Long stages (only when named, or with `full`):
#   bench      every CUDA last-layer and ReAct benchmark, and the warp-vs-block row kernel
#   persample  every CUDA per-sample benchmark (ResNet-18, ResNet-50, ViT-B/16; peers)
#   lowdim     the LowDimGrad projection benchmark and profile
#   alltests   the whole test suite
# $OUT/stages.tsv lists stage, exit status, seconds; $OUT/<stage>.txt holds each summary.
set -uo pipefail
start=$(date +%s)
deadline=$((start + ${GPU_CHECK_SECONDS:-540}))
args="${*:-tests sanitizer bandwidth resnet50}"
[[ "$args" == "full" ]] && args="tests sanitizer bandwidth resnet50 bench persample lowdim"
OUT="${OUT:-$(mktemp -d)}"
# Only the device's architecture and as many compile jobs as there are cores: the build is
# the largest fixed cost of the call.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" GRADOOD_WITH_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
status=0
printf "stage\texit\tseconds\n" > "$OUT/stages.tsv"

left() { echo $((deadline - $(date +%s))); }

# stage NAME FLOOR_SECONDS COMMAND...: runs COMMAND with at most the time left (less a
# 15-second margin for writing results), output to $OUT/NAME.log, and records it.
stage() {
  local name="$1" floor="$2"
  shift 2
  local budget=$(($(left) - 15))
  if ((budget < floor)); then
    echo "== $name: skipped, ${budget}s left (needs ${floor}s)" | tee "$OUT/$name.txt"
    printf "%s\tskipped\t0\n" "$name" >> "$OUT/stages.tsv"
    return
  fi
  echo "== $name (at most ${budget}s)"
  local t0 rc
  t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$budget" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf "%s\t%s\t%s\n" "$name" "$rc" "$(($(date +%s) - t0))" >> "$OUT/stages.tsv"
  ((rc == 124)) && echo "(cut off after ${budget}s)" >> "$OUT/$name.log"
  ((rc != 0)) && status=1
  tail -25 "$OUT/$name.log" | tee "$OUT/$name.txt"
}

wants() { case " $args " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

echo "== device"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"; } 2>&1 | tee "$OUT/device.txt"

stage build 60 python3 -m pip install --no-build-isolation --no-deps -e .
if ! python3 -c "import torch, gradood; assert torch._C._dispatch_has_kernel_for_dispatch_key('gradood::lastlayer_score', 'CUDA')" \
    >> "$OUT/device.txt" 2>&1; then
  echo "the build has no CUDA kernels: see $OUT/build.log" | tee -a "$OUT/device.txt"
  exit 1
fi

pytest_quiet=(python3 -m pytest -q -p no:cacheprovider)
wants tests && stage tests 60 "${pytest_quiet[@]}" tests -k cuda
wants sanitizer && stage sanitizer 60 compute-sanitizer --tool memcheck --error-exitcode 99 \
  "${pytest_quiet[@]}" tests/test_scores.py tests/test_ops.py tests/test_persample_ops.py tests/test_react_energy.py \
  -k "cuda and not arbitrary"
if wants bandwidth; then
  stage bandwidth 40 "${pytest_quiet[@]}" benchmarks/test_lastlayer_scores.py \
    -k "cuda and B8192 and C1000 and (gradood or copy or reference_compiled)" --benchmark-json="$OUT/bandwidth.json"
  [[ -s "$OUT/bandwidth.json" ]] && python3 benchmarks/summarize.py "$OUT/bandwidth.json" | tee "$OUT/bandwidth.md"
fi
if wants resnet50; then
  stage resnet50 60 bash -c "cd benchmarks && ${pytest_quiet[*]} test_persample.py -rs -k 'cuda and resnet50-batch and (gradood or training_step)' --benchmark-json='$OUT/resnet50.json'"
  [[ -s "$OUT/resnet50.json" ]] && python3 benchmarks/summarize.py "$OUT/resnet50.json" | tee "$OUT/resnet50.md"
fi
if wants bench; then
  stage bench 60 "${pytest_quiet[@]}" benchmarks/test_lastlayer_scores.py -k cuda --benchmark-json="$OUT/bench.json"
  [[ -s "$OUT/bench.json" ]] && python3 benchmarks/summarize.py "$OUT/bench.json" > "$OUT/bench.md"
  stage react 30 "${pytest_quiet[@]}" benchmarks/test_react.py -k cuda --benchmark-json="$OUT/react.json"
  [[ -s "$OUT/react.json" ]] && python3 benchmarks/summarize.py "$OUT/react.json" > "$OUT/react.md"
  for threads in 32 256; do
    stage "row_threads_$threads" 20 env GRADOOD_LASTLAYER_ROW_THREADS=$threads "${pytest_quiet[@]}" \
      benchmarks/test_lastlayer_scores.py -k "cuda and B8192 and C1000 and (gradood or copy)" \
      --benchmark-columns=median,iqr --benchmark-json="$OUT/row_threads_$threads.json"
  done
fi
if wants persample; then
  stage persample 60 bash -c "cd benchmarks && ${pytest_quiet[*]} test_persample.py -rs -k cuda --benchmark-json='$OUT/persample.json'"
  [[ -s "$OUT/persample.json" ]] && python3 benchmarks/summarize.py "$OUT/persample.json" > "$OUT/persample.md"
fi
if wants lowdim; then
  stage lowdim 60 bash -c "cd benchmarks && ${pytest_quiet[*]} test_lowdim.py -k cuda --benchmark-json='$OUT/lowdim.json' && python3 profile_lowdim.py --device cuda --batch 128 && python3 profile_lowdim.py --device cuda --batch 128 --last-stage"
fi
wants alltests && stage alltests 120 "${pytest_quiet[@]}" tests
echo "== done in $(($(date +%s) - start))s"
cat "$OUT/stages.tsv"
exit $status
