// The row kernels at the AVX512 level: csrc/cpu/lastlayer_rows_vec.inc, compiled with
// -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c by setup.py and CMakeLists.txt (the flags
// ATen's own build uses).
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__)
#error \
    "lastlayer_rows_AVX512.cpp must be compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma"
#endif
#include "cpu/lastlayer_rows_vec.inc"
