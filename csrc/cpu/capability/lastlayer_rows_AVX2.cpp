// The row kernels at the AVX2 level: csrc/cpu/lastlayer_rows_vec.inc, compiled with
// -mavx2 -mfma -mf16c by setup.py and CMakeLists.txt (the flags ATen's own build uses).
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#if !defined(__AVX2__) || !defined(__FMA__)
#error "lastlayer_rows_AVX2.cpp must be compiled with -mavx2 -mfma"
#endif
#include "cpu/lastlayer_rows_vec.inc"
