// Launchers of the per-sample squared-norm CUDA kernels (gradood::
// outer_product_sq_norm and conv2d_weight_sq_norm): raw pointers, strides and a
// stream, no torch headers (see lastlayer_terms_launch.h for why).
//
// Both compute, for every sample-group n = b * groups + g,
//     ‖G_n‖_F²,  G_n = Σ_t g_{n,t} a_{n,t}ᵀ   (out_features × in_features)
// and write out[b] = Σ_g ‖G_{b,g}‖_F², without ever writing G_n to memory:
//   kGhost        Σ_{t,s} ⟨a_t, a_s⟩⟨g_t, g_s⟩ in 64×64 tiles of (t, s), upper
//                 triangle only; neither T×T Gram matrix is written
//   kMaterialise  G_n in 64×64 tiles, each squared and summed in registers
//                 (a per-sample GEMM with a square-and-accumulate epilogue);
//                 when G_n has at most kDirectOutputs entries (depthwise
//                 convolutions) one block per n keeps all of G_n in registers
// Each block writes one partial sum to `workspace`; a second kernel adds them in
// a fixed order, so results are deterministic.
#pragma once

#include <cstdint>

#include "cuda/device.h"

namespace gradood {
namespace cuda {

enum SqNormMethod : int { kGhost = 0, kMaterialise = 1 };

constexpr int64_t kDirectOutputs = 32;

// Element (t, k) of sample-group n = b * groups + g of a dense row matrix:
// data[b * batch_stride + g * group_stride + t * row_stride + k * column_stride],
// t < rows, k < columns. Strides are in elements and may be anything (views).
template <typename scalar_t>
struct DenseRows {
  const scalar_t* data;
  int64_t groups;
  int64_t rows, columns;
  int64_t batch_stride, group_stride, row_stride, column_stride;
};

// The patches (im2col rows) of a 2-D convolution, read from its already padded
// input [B, C, H, W] (strides in elements): row t = (oy, ox) is an output
// position, column k = (c, ky, kx) an input channel of group g and a kernel
// tap; the element is input[b, g * channels_per_group + c, oy * stride_h +
// ky * dilation_h, ox * stride_w + kx * dilation_w].
template <typename scalar_t>
struct PatchRows {
  const scalar_t* data;
  int64_t groups, channels_per_group;
  int64_t batch_stride, channel_stride, height_stride, width_stride;
  int64_t kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w;
  int64_t out_h, out_w;
};

// Workspace entries (acc_t) the launch below needs for `samples` = B * groups
// sample-groups with `rows` positions, `activation_columns` = in_features per
// group and `grad_columns` = out_features per group.
int64_t sq_norm_workspace_size(int method, int64_t samples, int64_t rows,
                               int64_t activation_columns, int64_t grad_columns);

// out[b] for b < batch (acc_t: float, or double for double inputs);
// activations and grads share `groups`; batch * groups sample-groups.
template <typename scalar_t, typename acc_t>
cudaError_t launch_outer_product_sq_norm(const DenseRows<scalar_t>& activations,
                                         const DenseRows<scalar_t>& grads, int64_t batch,
                                         int method, acc_t* workspace, acc_t* out,
                                         cudaStream_t stream);

// The same with the activations read as convolution patches (implicit GEMM):
// the unfolded input is never formed.
template <typename scalar_t, typename acc_t>
cudaError_t launch_conv2d_weight_sq_norm(const PatchRows<scalar_t>& patches,
                                         const DenseRows<scalar_t>& grads, int64_t batch,
                                         int method, acc_t* workspace, acc_t* out,
                                         cudaStream_t stream);

}  // namespace cuda
}  // namespace gradood
