// The float32 row kernels of lastlayer_terms (CPU), one table per instruction-set
// level. csrc/cpu/lastlayer_rows_vec.inc holds them, written on ATen's
// at::vec::Vectorized<float>; csrc/cpu/capability/ compiles it once per level
// (DEFAULT, and on x86-64 AVX2 and AVX512, with the flags ATen uses for its own
// kernels), and row_kernels() picks one at the first call:
//   GRADOOD_CPU_CAPABILITY=default|avx2|avx512  forces a level (one the CPU has);
//   otherwise ATen's level, torch.backends.cpu.get_cpu_capability(), which
//   ATEN_CPU_CAPABILITY sets in the same way for torch's own kernels.
#pragma once

#include <cstdint>
#include <string>

namespace gradood {
namespace cpu {

// Rows of at most kMaxShortRow classes go kRowTile at a time, one row per lane.
constexpr int64_t kMaxShortRow = 32;
constexpr int64_t kRowTile = 16;

struct RowKernels {
  const char* capability;  // "DEFAULT", "AVX2", "AVX512"
  // The `wanted` logit terms (a TermMask of common/lastlayer_terms_math.h) of one
  // row and its argmax (-1 where only the max logit is wanted: no search for it);
  // scratch holds num_classes floats. Returns false, writing
  // nothing, for a row the fast path does not cover (a NaN, or an infinite max):
  // the caller's exact scalar path defines those rows.
  bool (*logit_terms_row)(const float* logits, int64_t num_classes, float temperature,
                          uint32_t wanted, float* out, int64_t* argmax, float* scratch);
  // The same for `rows` (<= kRowTile) consecutive rows of num_classes (<= kMaxShortRow)
  // logits: out is rows x kNumTerms; ok[r] false where row r needs the scalar path.
  void (*logit_terms_short_rows)(const float* logits, int64_t rows, int64_t num_classes,
                                 float temperature, uint32_t wanted, float* out, int64_t* argmax,
                                 bool* ok);
  // The `wanted` feature terms (feature_l1, feature_l2, feature_clipped_l1) of one row.
  void (*feature_terms_row)(const float* features, int64_t num_features, float clip,
                            uint32_t wanted, float* out);
  // bfloat16 / IEEE half bit patterns widened to float32.
  void (*widen_bfloat16)(const uint16_t* bits, int64_t count, float* out);
  void (*widen_half)(const uint16_t* bits, int64_t count, float* out);
  // out[j] = Σ_i values[i] · rows[indices[i] · stride + j] for j < kGatherColumns, the sum over
  // i in order (at AVX-512: the even and the odd i in two sums, added at the end), accumulated
  // in float32 registers (the pruned-feature head product of cpu/pruned_linear_kernel.cpp, whose
  // blocks are padded to kGatherColumns).
  void (*weighted_row_sum)(const float* values, const int64_t* indices, int64_t count,
                           const float* rows, int64_t stride, float* out);
};

// Columns weighted_row_sum takes at once: 64 floats of each gathered row (256 bytes), so that a
// block of a [D, C] matrix (D · 256 bytes) stays in a core's L2 cache while every row of the
// batch is summed against it.
constexpr int64_t kGatherColumns = 64;

// The table of the level in use (chosen once, at the first call).
const RowKernels& row_kernels();

// Its level's name (the `gradood::cpu_capability` operator).
std::string cpu_capability();

}  // namespace cpu
}  // namespace gradood
