#!/usr/bin/env bash
# The last-layer score benchmarks at every instruction-set level this CPU has, each in
# its own process with gradood's and torch's kernels at that level
# (GRADOOD_CPU_CAPABILITY and ATEN_CPU_CAPABILITY), and the machine recorded:
#
#   bash benchmarks/run_levels.sh [out_dir]      # default: bench-levels/
#
# GRADOOD_BENCH_SIZES=small GRADOOD_BENCH_DTYPES=float32 keep it to a few minutes a
# level; extra pytest arguments go in PYTEST_ARGS (e.g. "-k 'B1024 and C1000'"), LEVELS="avx2"
# picks levels.
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
for level in ${LEVELS:-$levels}; do
  echo "== level $level"
  # shellcheck disable=SC2086
  GRADOOD_CPU_CAPABILITY=$level ATEN_CPU_CAPABILITY=$level python -m pytest "$root/benchmarks/test_lastlayer_scores.py" \
    -q -p no:cacheprovider --benchmark-json="$out/bench-$level.json" ${PYTEST_ARGS:-} > "$out/pytest-$level.log" ||
    echo "(some benchmarks failed at $level: $out/pytest-$level.log; e.g. torch.compile at the DEFAULT level)"
  python "$root/benchmarks/summarize.py" "$out/bench-$level.json" > "$out/table-$level.md"
  # the medians alone, small enough to commit (benchmarks/results/; the docs' tables and plots read them)
  python "$root/benchmarks/summarize.py" --condense "$out/levels-$level.json" --machine "$out/machine.txt" "$out/bench-$level.json"
  cat "$out/table-$level.md"
done
