// Vectorised float32 row kernels of lastlayer_terms (CPU). Each function is
// compiled for several instruction sets and picked at load time (GCC/Clang
// target_clones), so one binary uses AVX-512 or AVX2 where the CPU has them.
#pragma once

#include <cstdint>

#include "common/lastlayer_terms_math.h"

namespace gradood {
namespace cpu {

// Writes the `wanted` logit terms of one row and its argmax. `scratch` holds
// num_classes floats. The uniform_deviation_l1 pass runs only when that term
// is wanted. Returns false, writing nothing, for a row the fast path does not
// cover (a NaN or an infinite max); the caller then uses the exact scalar
// path, which defines those rows' results.
bool logit_terms_row_float(const float* logits, int64_t num_classes,
                           float temperature, TermMask wanted, float* out,
                           int64_t* argmax, float* scratch);

// Rows with at most kMaxShortRow classes are processed kRowTile at a time, one
// row per vector lane: a per-row loop over 10 logits would be all overhead.
constexpr int64_t kMaxShortRow = 32;
constexpr int64_t kRowTile = 16;

// The `wanted` logit terms of `rows` (<= kRowTile) consecutive rows of
// num_classes (<= kMaxShortRow) logits: out is rows x kNumTerms, argmax and ok
// hold `rows` entries. ok[r] is false, and row r untouched, where the row needs
// the scalar path (a NaN or an infinite max).
void logit_terms_short_rows_float(const float* logits, int64_t rows,
                                  int64_t num_classes, float temperature,
                                  TermMask wanted, float* out, int64_t* argmax,
                                  bool* ok);

// Writes the `wanted` feature terms (kFeatureL1, kFeatureL2, kFeatureClippedL1).
void feature_terms_row_float(const float* features, int64_t num_features,
                             float clip, TermMask wanted, float* out);

// Widens bfloat16 / IEEE half bit patterns to float32.
void widen_bfloat16(const uint16_t* bits, int64_t count, float* out);
void widen_half(const uint16_t* bits, int64_t count, float* out);

}  // namespace cpu
}  // namespace gradood
