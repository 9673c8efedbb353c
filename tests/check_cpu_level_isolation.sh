#!/usr/bin/env bash
# The AVX2 and AVX-512 builds of the CPU row kernels must not leak their instructions
# into code every CPU runs: a shared inline function (a C++ COMDAT) compiled in a
# level's file could be the copy the linker keeps for all callers, and an AVX2-only
# CPU would then crash on an AVX-512 instruction. Disassembles gradood._C and fails
# on any function outside gradood::cpu::AVX2 / AVX512 with a VEX or EVEX instruction
# (every AVX instruction's mnemonic starts with v: vmovss on xmm as much as vfmadd on zmm).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "$(uname -m)" != "x86_64" ]] || ! command -v objdump > /dev/null; then
  echo "check_cpu_level_isolation: skipped (needs x86-64 and objdump)"
  exit 0
fi
library="$(python -c 'import gradood._C as c; print(c.__file__)')"
leaks="$(objdump -d --no-show-raw-insn -C "$library" | awk '
  /^[0-9a-f]+ <.*>:$/ { name = $0; sub(/^[0-9a-f]+ </, "", name); sub(/>:$/, "", name); next }
  $2 ~ /^v[a-z]/ && $2 != "verw" {
    if (name !~ /gradood::cpu::AVX(2|512)::/ && !(name in seen)) { seen[name] = 1; print name }
  }')"
if [[ -n "$leaks" ]]; then
  echo "check_cpu_level_isolation: functions outside the AVX2/AVX512 kernels use AVX instructions:" >&2
  echo "$leaks" | head -20 >&2
  exit 1
fi
echo "check_cpu_level_isolation: ok (AVX2/AVX-512 instructions only in gradood::cpu::AVX2 and ::AVX512)"
