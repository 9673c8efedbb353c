// The row kernels as a CPU without x86 SIMD runs them (aarch64's DEFAULT build): the
// DEFAULT level's source with its SSE2 paths left out. Built on x86-64 too, where only
// GRADOOD_CPU_CAPABILITY=portable selects it, so that this code is tested there.
#define CPU_CAPABILITY PORTABLE
#define CPU_CAPABILITY_DEFAULT
#define GRADOOD_NO_SSE2
#include "cpu/lastlayer_rows_vec.inc"
