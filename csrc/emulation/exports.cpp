// C entry points into the CUDA launchers, for the emulated build only
// (GRADOOD_CUDA_EMULATION): tests/cuda_emulation.py compiles csrc/cuda/*.cu
// with the host compiler, links this file and calls these through ctypes on
// CPU tensors. dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16.
#include <cstdint>

#include "cuda/device.h"
#include "cuda/lastlayer_terms_launch.h"
#include "cuda/norm_affine_launch.h"
#include "cuda/persample_norms_launch.h"

namespace {

using namespace gradood::cuda;

// layout: groups, rows, columns, batch_stride, group_stride, row_stride, column_stride
template <typename scalar_t>
DenseRows<scalar_t> dense_rows(const void* data, const int64_t* layout) {
  return DenseRows<scalar_t>{static_cast<const scalar_t*>(data),
                             layout[0],
                             layout[1],
                             layout[2],
                             layout[3],
                             layout[4],
                             layout[5],
                             layout[6]};
}

// layout: groups, channels_per_group, batch_stride, channel_stride, height_stride,
// width_stride, kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w, out_h, out_w
template <typename scalar_t>
PatchRows<scalar_t> patch_rows(const void* data, const int64_t* l) {
  return PatchRows<scalar_t>{static_cast<const scalar_t*>(data),
                             l[0],
                             l[1],
                             l[2],
                             l[3],
                             l[4],
                             l[5],
                             l[6],
                             l[7],
                             l[8],
                             l[9],
                             l[10],
                             l[11],
                             l[12],
                             l[13]};
}

template <typename scalar_t, typename acc_t>
int outer_product(const void* a, const int64_t* a_layout, const void* g, const int64_t* g_layout,
                  int64_t batch, int method, void* workspace, void* out) {
  return launch_outer_product_sq_norm<scalar_t, acc_t>(
      dense_rows<scalar_t>(a, a_layout), dense_rows<scalar_t>(g, g_layout), batch, method,
      static_cast<acc_t*>(workspace), static_cast<acc_t*>(out), nullptr);
}

template <typename scalar_t, typename acc_t>
int conv2d(const void* x, const int64_t* x_layout, const void* g, const int64_t* g_layout,
           int64_t batch, int method, void* workspace, void* out) {
  return launch_conv2d_weight_sq_norm<scalar_t, acc_t>(
      patch_rows<scalar_t>(x, x_layout), dense_rows<scalar_t>(g, g_layout), batch, method,
      static_cast<acc_t*>(workspace), static_cast<acc_t*>(out), nullptr);
}

template <typename scalar_t, typename acc_t>
int terms(const void* logits, const void* features, int64_t batch, int64_t classes,
          int64_t num_features, double temperature, double clip, void* out, int64_t* argmax) {
  return launch_lastlayer_terms<scalar_t, acc_t>(
      static_cast<const scalar_t*>(logits), static_cast<const scalar_t*>(features), batch, classes,
      num_features, temperature, clip, static_cast<acc_t*>(out), argmax, nullptr);
}

Strided3 strided3(const int64_t* strides) { return Strided3{strides[0], strides[1], strides[2]}; }

template <typename scalar_t, typename acc_t>
int norm_affine(const void* grad_output, const int64_t* grad_strides, const void* input,
                const int64_t* input_strides, const void* shift, const int64_t* shift_strides,
                const void* scale, const int64_t* scale_strides, int64_t batch, int64_t channels,
                int64_t positions, void* weight, void* bias) {
  return launch_norm_affine_grads<scalar_t, acc_t>(
      static_cast<const scalar_t*>(grad_output), strided3(grad_strides),
      static_cast<const scalar_t*>(input), strided3(input_strides),
      static_cast<const scalar_t*>(shift), strided3(shift_strides),
      static_cast<const scalar_t*>(scale), strided3(scale_strides), batch, channels, positions,
      static_cast<acc_t*>(weight), static_cast<acc_t*>(bias), nullptr);
}

}  // namespace

#define GRADOOD_BY_DTYPE(dtype, function, ...)            \
  switch (dtype) {                                        \
    case 0:                                               \
      return function<float, float>(__VA_ARGS__);         \
    case 1:                                               \
      return function<double, double>(__VA_ARGS__);       \
    case 2:                                               \
      return function<__half, float>(__VA_ARGS__);        \
    case 3:                                               \
      return function<__nv_bfloat16, float>(__VA_ARGS__); \
    default:                                              \
      return static_cast<int>(cudaErrorInvalidValue);     \
  }

extern "C" {

int64_t gradood_emu_sq_norm_workspace_size(int method, int64_t samples, int64_t rows,
                                           int64_t activation_columns, int64_t grad_columns) {
  return sq_norm_workspace_size(method, samples, rows, activation_columns, grad_columns);
}

int gradood_emu_outer_product_sq_norm(int dtype, const void* a, const int64_t* a_layout,
                                      const void* g, const int64_t* g_layout, int64_t batch,
                                      int method, void* workspace, void* out) {
  GRADOOD_BY_DTYPE(dtype, outer_product, a, a_layout, g, g_layout, batch, method, workspace, out)
}

int gradood_emu_conv2d_weight_sq_norm(int dtype, const void* x, const int64_t* x_layout,
                                      const void* g, const int64_t* g_layout, int64_t batch,
                                      int method, void* workspace, void* out) {
  GRADOOD_BY_DTYPE(dtype, conv2d, x, x_layout, g, g_layout, batch, method, workspace, out)
}

int gradood_emu_norm_affine_grads(int dtype, const void* grad_output, const int64_t* grad_strides,
                                  const void* input, const int64_t* input_strides,
                                  const void* shift, const int64_t* shift_strides,
                                  const void* scale, const int64_t* scale_strides, int64_t batch,
                                  int64_t channels, int64_t positions, void* weight, void* bias) {
  GRADOOD_BY_DTYPE(dtype, norm_affine, grad_output, grad_strides, input, input_strides, shift,
                   shift_strides, scale, scale_strides, batch, channels, positions, weight, bias)
}

int gradood_emu_lastlayer_terms(int dtype, const void* logits, const void* features, int64_t batch,
                                int64_t classes, int64_t num_features, double temperature,
                                double clip, void* out, int64_t* argmax) {
  GRADOOD_BY_DTYPE(dtype, terms, logits, features, batch, classes, num_features, temperature, clip,
                   out, argmax)
}

}  // extern "C"
