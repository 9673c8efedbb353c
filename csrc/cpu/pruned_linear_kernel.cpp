// CPU kernels of gradood::top_features and gradood::pruned_linear (ops/pruned_linear.h).
//
// top_features: per row (rows split across threads), std::nth_element on a copy finds the
// keep-th largest value, then one pass in index order keeps the entries above it and, of those
// equal to it, the lowest-indexed ones; s₁ and s₂ are summed in float64 on the way.
//
// pruned_linear: out[b, :] = Σ_i v_bi · Wᵀ[j_bi, :], K rows of Wᵀ [D, C] per sample instead of a
// dense GEMM's D. Wᵀ comes in blocks of kGatherColumns (64) classes, each block [D, 64]
// contiguous (D · 256 bytes, few pages: Wᵀ itself, with rows C · 4 bytes apart, cost a TLB miss
// per gathered row and ran 1.8x slower), which stays in L2 while every sample of the batch is
// summed against it
// (cpu/lastlayer_rows.h's weighted_row_sum, vectorised per instruction-set level, keeps the 64
// sums in registers over the K rows). Blocks are split across threads where there are enough of
// them (each block of Wᵀ is then read from memory once), samples otherwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "cpu/lastlayer_rows.h"
#include "ops/pruned_linear.h"

namespace gradood {
namespace {

using cpu::kGatherColumns;
static_assert(kGatherColumns == kPrunedLinearBlock,
              "one block width for the kernel and the schema");

template <typename T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

// An unsigned key ordered as the (non-NaN) values, -0 and +0 one key (they compare equal).
template <typename T, typename Key = typename KeyOf<T>::type>
Key sortable_key(T value) {
  constexpr Key sign = Key(1) << (8 * sizeof(Key) - 1);
  const T canonical = value == T(0) ? T(0) : value;
  Key bits;
  std::memcpy(&bits, &canonical, sizeof(bits));
  return (bits & sign) ? ~bits : (bits | sign);
}

template <typename T, typename Key = typename KeyOf<T>::type>
T value_of_key(Key key) {
  constexpr Key sign = Key(1) << (8 * sizeof(Key) - 1);
  const Key bits = (key & sign) ? (key ^ sign) : ~key;
  T value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// The rank-th largest of count non-NaN values (1 <= rank <= count) by a radix selection on their
// keys, 8 bits a pass from the top, keeping only the candidates whose digits so far match the
// answer's: branch-free histogram and compaction passes (std::nth_element's comparisons
// mispredict on half the elements of random data; this ran 4-5x faster on 2,048 floats).
template <typename T, typename Key = typename KeyOf<T>::type>
T radix_select_largest(const T* values, int64_t count, int64_t rank, Key* keys) {
  for (int64_t i = 0; i < count; ++i) keys[i] = sortable_key(values[i]);
  int64_t candidates = count;
  for (int shift = 8 * sizeof(Key) - 8; shift >= 0; shift -= 8) {
    if (candidates <= 32) break;
    int64_t histogram[256] = {};
    for (int64_t i = 0; i < candidates; ++i) ++histogram[(keys[i] >> shift) & 0xff];
    int digit = 255;
    for (; digit > 0 && rank > histogram[digit]; --digit) rank -= histogram[digit];
    int64_t kept = 0;
    for (int64_t i = 0; i < candidates; ++i) {
      const Key key = keys[i];
      keys[kept] = key;
      kept += static_cast<int64_t>((key >> shift) & 0xff) == digit;
    }
    candidates = kept;
  }
  std::nth_element(keys, keys + (rank - 1), keys + candidates, std::greater<Key>());
  return value_of_key<T>(keys[rank - 1]);
}

template <typename T, typename Key = typename KeyOf<T>::type>
void select_row(const T* row, int64_t count, int64_t keep, Key* scratch, T* values,
                int64_t* indices, double* total, double* kept_sum) {
  double sum = 0.0;
  bool nan = false;
  for (int64_t j = 0; j < count; ++j) {
    sum += static_cast<double>(row[j]);
    nan |= std::isnan(row[j]);
  }
  if (nan) {  // no order to select by: the caller's score is NaN for this row
    for (int64_t i = 0; i < keep; ++i) {
      values[i] = std::numeric_limits<T>::quiet_NaN();
      indices[i] = i;
    }
    *total = *kept_sum = std::numeric_limits<double>::quiet_NaN();
    return;
  }
  const T threshold = radix_select_largest(row, count, keep, scratch);
  int64_t above = 0;
  for (int64_t j = 0; j < count; ++j) above += row[j] > threshold;
  const int64_t room = keep - above;  // >= 1: the threshold itself is among the keep largest
  int64_t kept = 0, ties = 0;
  double kept_total = 0.0;
  // Branch-free compaction: every entry is written at the next free place, which advances
  // only for a kept one (the last write lands on a spare slot: values and indices hold keep + 1).
  for (int64_t j = 0; j < count; ++j) {
    const T value = row[j];
    const bool tie = value == threshold;
    const bool keep_it = value > threshold || (tie && ties < room);
    ties += tie;
    values[kept] = value;
    indices[kept] = j;
    kept_total += keep_it ? static_cast<double>(value) : 0.0;
    kept += keep_it;
  }
  TORCH_INTERNAL_ASSERT(kept == keep, "top_features: kept ", kept, " entries instead of ", keep);
  *total = sum;
  *kept_sum = kept_total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> top_features_cpu(
    const at::Tensor& features, int64_t keep) {
  check_top_features_inputs(features, keep);
  const at::Tensor x = features.contiguous();
  const int64_t batch = x.size(0), count = x.size(1);
  at::Tensor values = at::empty({batch, keep}, x.options());
  at::Tensor indices = at::empty({batch, keep}, x.options().dtype(at::kLong));
  at::Tensor total = at::empty({batch}, x.options().dtype(at::kDouble));
  at::Tensor kept_sum = at::empty({batch}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "top_features", [&] {
    const scalar_t* rows = x.const_data_ptr<scalar_t>();
    scalar_t* out_values = values.mutable_data_ptr<scalar_t>();
    int64_t* out_indices = indices.mutable_data_ptr<int64_t>();
    double* out_total = total.mutable_data_ptr<double>();
    double* out_kept = kept_sum.mutable_data_ptr<double>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(count, 1));
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      std::vector<typename KeyOf<scalar_t>::type> scratch(count);
      std::vector<scalar_t> row_values(keep + 1);  // + 1: the compaction's spare slot
      std::vector<int64_t> row_indices(keep + 1);
      for (int64_t b = begin; b < end; ++b) {
        select_row(rows + b * count, count, keep, scratch.data(), row_values.data(),
                   row_indices.data(), out_total + b, out_kept + b);
        std::copy(row_values.begin(), row_values.begin() + keep, out_values + b * keep);
        std::copy(row_indices.begin(), row_indices.begin() + keep, out_indices + b * keep);
      }
    });
  });
  return {values, indices, total, kept_sum};
}

// kGatherColumns sums over the gathered rows, float32 by the level's vectorised kernel, float64
// here (the compiler vectorises j).
void weighted_row_sum(const float* values, const int64_t* indices, int64_t count, const float* rows,
                      float* out) {
  cpu::row_kernels().weighted_row_sum(values, indices, count, rows, kGatherColumns, out);
}

void weighted_row_sum(const double* values, const int64_t* indices, int64_t count,
                      const double* rows, double* out) {
  double sums[kGatherColumns] = {};
  for (int64_t i = 0; i < count; ++i) {
    const double weight = values[i];
    const double* row = rows + indices[i] * kGatherColumns;
    for (int64_t j = 0; j < kGatherColumns; ++j) sums[j] += weight * row[j];
  }
  std::copy(sums, sums + kGatherColumns, out);
}

at::Tensor pruned_linear_cpu(const at::Tensor& values, const at::Tensor& indices,
                             const at::Tensor& weight_blocks, int64_t classes) {
  check_pruned_linear_inputs(values, indices, weight_blocks, classes);
  const at::Tensor v = values.contiguous(), index = indices.contiguous();
  const at::Tensor table = weight_blocks.contiguous();
  const int64_t batch = v.size(0), kept = v.size(1);
  const int64_t count = table.size(1), blocks = table.size(0);
  if (index.numel() > 0) {
    const auto [min_index, max_index] = at::aminmax(index);
    const int64_t low = min_index.item<int64_t>(), high = max_index.item<int64_t>();
    TORCH_CHECK(low >= 0 && high < count, "pruned_linear: indices must lie in [0, ", count,
                ") (the weight's D), got [", low, ", ", high, "]");
  }
  at::Tensor out = at::empty({batch, classes}, v.options());
  if (batch == 0) return out;
  const bool by_block = blocks >= 2 * at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "pruned_linear", [&] {
    const scalar_t* value = v.const_data_ptr<scalar_t>();
    const int64_t* position = index.const_data_ptr<int64_t>();
    const scalar_t* rows = table.const_data_ptr<scalar_t>();
    scalar_t* result = out.mutable_data_ptr<scalar_t>();
    auto one = [&](int64_t b, int64_t block) {
      const int64_t first = block * kGatherColumns;
      const int64_t columns = std::min(kGatherColumns, classes - first);
      scalar_t sums[kGatherColumns];
      weighted_row_sum(value + b * kept, position + b * kept, kept,
                       rows + block * count * kGatherColumns, sums);
      std::copy(sums, sums + columns, result + b * classes + first);
    };
    if (by_block) {
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t block = begin; block < end; ++block) {
          for (int64_t b = 0; b < batch; ++b) one(b, block);
        }
      });
    } else {
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        for (int64_t block = 0; block < blocks; ++block) {
          for (int64_t b = begin; b < end; ++b) one(b, block);
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradood, CPU, m) {
  m.impl("top_features", &top_features_cpu);
  m.impl("pruned_linear", &pruned_linear_cpu);
}

}  // namespace gradood
