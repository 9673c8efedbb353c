// CPU kernel of gradood::norm_affine_grads:
//   weight[b, c] = Σ_t g · (x − shift) · scale,   bias[b, c] = Σ_t g.
// Two one-pass kernels cover the layouts the norm rules produce, reading g and x once
// and never writing g · x̂:
//   * per-row statistics (batch, group and instance norms: shift and scale constant
//     along T, g and x contiguous along T): one (b, c) row at a time;
//   * per-position statistics (layer and RMS norms over the last dim: shift and scale
//     constant along C, g and x contiguous along C): a block of channels of one sample
//     at a time, its sums in a row of accumulators over the positions.
// Other layouts use the ATen composition. Sums run in float lanes over blocks of
// kBlock elements, the blocks added in double (float64 inputs: double throughout).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "ops/norm_affine.h"

namespace gradood {
namespace {

constexpr int64_t kBlock = 256;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

struct View {  // a [B, C, T] tensor's data and strides
  const void* data;
  int64_t batch, channel, position;
};

View view_of(const at::Tensor& t) {
  return {t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename scalar_t>
const scalar_t* at_offset(const View& v, int64_t b, int64_t c, int64_t t) {
  return static_cast<const scalar_t*>(v.data) + b * v.batch + c * v.channel + t * v.position;
}

// shift and scale constant along T; g and x contiguous along T.
template <typename scalar_t>
void per_row_statistics(const View& g, const View& x, const View* shift, const View& scale,
                        int64_t batch, int64_t channels, int64_t positions,
                        acc_type<scalar_t>* weight, acc_type<scalar_t>* bias) {
  using acc_t = acc_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(positions, 1));
  at::parallel_for(0, batch * channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / channels, c = row % channels;
      const scalar_t* gp = at_offset<scalar_t>(g, b, c, 0);
      const scalar_t* xp = at_offset<scalar_t>(x, b, c, 0);
      const acc_t s = shift != nullptr ? acc_t(*at_offset<scalar_t>(*shift, b, c, 0)) : acc_t(0);
      double weighted = 0.0, total = 0.0;
      for (int64_t start = 0; start < positions; start += kBlock) {
        const int64_t stop = std::min(start + kBlock, positions);
        acc_t w = 0, t = 0;
#pragma omp simd reduction(+ : w, t)
        for (int64_t i = start; i < stop; ++i) {
          const acc_t gi = acc_t(gp[i]);
          w += gi * (acc_t(xp[i]) - s);
          t += gi;
        }
        weighted += w;
        total += t;
      }
      weight[row] = static_cast<acc_t>(weighted) * acc_t(*at_offset<scalar_t>(scale, b, c, 0));
      bias[row] = static_cast<acc_t>(total);
    }
  });
}

// shift and scale constant along C; g and x contiguous along C.
template <typename scalar_t>
void per_position_statistics(const View& g, const View& x, const View* shift, const View& scale,
                             int64_t batch, int64_t channels, int64_t positions,
                             acc_type<scalar_t>* weight, acc_type<scalar_t>* bias) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t kChannels = 256;  // channels per task: their accumulators stay in L1
  const int64_t blocks = (channels + kChannels - 1) / kChannels;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    acc_t w[kChannels], t[kChannels];
    double weighted[kChannels], total[kChannels];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, c0 = (task % blocks) * kChannels;
      const int64_t width = std::min(kChannels, channels - c0);
      std::fill(weighted, weighted + width, 0.0);
      std::fill(total, total + width, 0.0);
      for (int64_t start = 0; start < positions; start += kBlock) {
        const int64_t stop = std::min(start + kBlock, positions);
        std::fill(w, w + width, acc_t(0));
        std::fill(t, t + width, acc_t(0));
        for (int64_t p = start; p < stop; ++p) {
          const scalar_t* gp = at_offset<scalar_t>(g, b, c0, p);
          const scalar_t* xp = at_offset<scalar_t>(x, b, c0, p);
          const acc_t s =
              shift != nullptr ? acc_t(*at_offset<scalar_t>(*shift, b, c0, p)) : acc_t(0);
          const acc_t r = acc_t(*at_offset<scalar_t>(scale, b, c0, p));
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) {
            const acc_t gc = acc_t(gp[c]);
            w[c] += gc * ((acc_t(xp[c]) - s) * r);
            t[c] += gc;
          }
        }
        for (int64_t c = 0; c < width; ++c) {
          weighted[c] += w[c];
          total[c] += t[c];
        }
      }
      for (int64_t c = 0; c < width; ++c) {
        weight[b * channels + c0 + c] = static_cast<acc_t>(weighted[c]);
        bias[b * channels + c0 + c] = static_cast<acc_t>(total[c]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> composed(const at::Tensor& grad_output, const at::Tensor& input,
                                            const std::optional<at::Tensor>& shift,
                                            const at::Tensor& scale, at::ScalarType acc) {
  const at::Tensor g = grad_output.to(acc);
  at::Tensor normalised = input.to(acc);
  if (shift.has_value()) normalised = normalised - shift->to(acc);
  normalised = normalised * scale.to(acc);
  return {(g * normalised).sum(2), g.sum(2)};
}

// Every tensor of the problem has stride 0 (statistics) or 1 (data) in `dim`.
bool layout_is(int64_t dim, const at::Tensor& g, const at::Tensor& x,
               const std::optional<at::Tensor>& shift, const at::Tensor& scale) {
  const auto data = [dim](const at::Tensor& t) { return t.size(dim) <= 1 || t.stride(dim) == 1; };
  const auto constant = [dim](const at::Tensor& t) {
    return t.size(dim) <= 1 || t.stride(dim) == 0;
  };
  return data(g) && data(x) && constant(scale) && (!shift.has_value() || constant(*shift));
}

std::tuple<at::Tensor, at::Tensor> norm_affine_grads_cpu(const at::Tensor& grad_output,
                                                         const at::Tensor& input,
                                                         const std::optional<at::Tensor>& shift,
                                                         const at::Tensor& scale) {
  check_norm_affine_inputs(grad_output, input, shift, scale);
  const auto acc = grad_output.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool rows = layout_is(2, grad_output, input, shift, scale);
  const bool positions = !rows && layout_is(1, grad_output, input, shift, scale);
  if (!rows && !positions) return composed(grad_output, input, shift, scale, acc);
  const int64_t batch = grad_output.size(0), channels = grad_output.size(1),
                count = grad_output.size(2);
  at::Tensor weight = at::empty({batch, channels}, grad_output.options().dtype(acc));
  at::Tensor bias = at::empty({batch, channels}, grad_output.options().dtype(acc));
  if (batch * channels == 0) return {weight, bias};
  if (count == 0) return {weight.zero_(), bias.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_output.scalar_type(), "norm_affine_grads_cpu", [&] {
        using acc_t = acc_type<scalar_t>;
        const View g = view_of(grad_output), x = view_of(input), r = view_of(scale);
        const View s = shift.has_value() ? view_of(*shift) : View{};
        const View* shift_view = shift.has_value() ? &s : nullptr;
        acc_t* w = weight.mutable_data_ptr<acc_t>();
        acc_t* b = bias.mutable_data_ptr<acc_t>();
        if (rows) {
          per_row_statistics<scalar_t>(g, x, shift_view, r, batch, channels, count, w, b);
        } else {
          per_position_statistics<scalar_t>(g, x, shift_view, r, batch, channels, count, w, b);
        }
      });
  return {weight, bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradood, CPU, m) { m.impl("norm_affine_grads", &norm_affine_grads_cpu); }

}  // namespace gradood
