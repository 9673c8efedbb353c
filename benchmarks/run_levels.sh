#!/usr/bin/env bash
# Benchmarks at every instruction-set level this CPU has, each in its own process with
# gradood's and torch's kernels at that level (GRADOOD_CPU_CAPABILITY and
# ATEN_CPU_CAPABILITY; "portable", gradood's DEFAULT code without its SSE2 paths, runs beside
# torch's DEFAULT), and the machine recorded:
#
#   bash benchmarks/run_levels.sh [out_dir]      # default: bench-levels/
#   BENCH_FILES="test_ash.py test_dice.py test_scale.py" LEVELS="avx512 avx2 default portable" \
#     bash benchmarks/run_levels.sh out/
#
# BENCH_FILES defaults to test_lastlayer_scores.py, LEVELS to default, avx2 and avx512 where
# the CPU has them. GRADOOD_BENCH_SIZES=small GRADOOD_BENCH_DTYPES=float32 keep the last-layer
# scores to a few minutes a level; extra pytest arguments go in PYTEST_ARGS (e.g.
# "-k 'B1024 and C1000'"). Each level gets its own, emptied torch.compile cache
# (TORCHINDUCTOR_CACHE_DIR): a kernel inductor compiled for one level and reused at another
# crashed (a segmentation fault in the compiled ASH reference at AVX2 after an AVX-512 run).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-bench-levels}"
mkdir -p "$out"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  lscpu | grep -E "^(Model name|Architecture|CPU\(s\)|Thread|Core|Socket|Flags)"
  python -c "import torch, gradood; print('torch', torch.__version__, '| threads', torch.get_num_threads())"
} > "$out/machine.txt"
flags="$(lscpu | grep '^Flags')"
levels="default"
if [[ "$(uname -m)" == "x86_64" ]]; then
  [[ "$flags" == *" avx2 "* && "$flags" == *" fma "* ]] && levels="$levels avx2"
  [[ "$flags" == *" avx512f "* && "$flags" == *" avx512bw "* && "$flags" == *" avx512vl "* ]] && levels="$levels avx512"
fi
files="${BENCH_FILES:-test_lastlayer_scores.py}"
for level in ${LEVELS:-$levels}; do
  echo "== level $level"
  aten_level=$level
  [[ "$level" == "portable" ]] && aten_level=default
  cache="$(mktemp -d)"
  for file in $files; do
    name="${file%.py}"
    name="${name#test_}"
    [[ "$files" == "test_lastlayer_scores.py" ]] && name=bench  # the file names the docs read
    # shellcheck disable=SC2086
    TORCHINDUCTOR_CACHE_DIR="$cache" GRADOOD_CPU_CAPABILITY=$level ATEN_CPU_CAPABILITY=$aten_level \
      python -m pytest "$root/benchmarks/$file" -q -p no:cacheprovider --benchmark-json="$out/$name-$level.json" \
      ${PYTEST_ARGS:-} > "$out/pytest-$name-$level.log" ||
      echo "(some benchmarks failed at $level: $out/pytest-$name-$level.log)"
    if [[ "$name" == "bench" ]]; then
      python "$root/benchmarks/summarize.py" "$out/bench-$level.json" > "$out/table-$level.md"
      # the medians alone, small enough to commit (benchmarks/results/; the docs' tables and plots read them)
      python "$root/benchmarks/summarize.py" --condense "$out/levels-$level.json" --machine "$out/machine.txt" "$out/bench-$level.json"
      cat "$out/table-$level.md"
    fi
  done
  rm -rf "$cache"
done
