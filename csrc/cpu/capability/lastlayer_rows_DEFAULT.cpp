// The row kernels at the DEFAULT level: csrc/cpu/lastlayer_rows_vec.inc, compiled with
// no instruction-set flags by setup.py and CMakeLists.txt (the flags ATen's own build uses).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "cpu/lastlayer_rows_vec.inc"
