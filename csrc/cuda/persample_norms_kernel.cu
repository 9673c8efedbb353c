// CUDA kernels of gradood::outer_product_sq_norm and conv2d_weight_sq_norm
// (what they compute: persample_norms_launch.h). Tiles of 64×64 outputs per
// block of 256 threads, each thread holding a 4×4 register tile, operands
// staged through shared memory 16 reduction steps at a time and converted to
// the accumulator type on load.
#include "cuda/device.h"
#include "cuda/persample_norms_launch.h"
#include "cuda/warp_reduce.h"

namespace gradood {
namespace cuda {
namespace {

constexpr int kTile = 64;         // output tile edge
constexpr int kStep = 16;         // reduction steps per shared-memory stage
constexpr int kSub = kTile / 16;  // register tile edge: 16×16 threads × 4×4

// Element readers: (n, t, k) -> value, zero outside rows × columns.
template <typename scalar_t, typename acc_t>
struct DenseReader {
  DenseRows<scalar_t> m;
  __device__ int64_t rows() const { return m.rows; }
  __device__ int64_t columns() const { return m.columns; }
  __device__ acc_t at(int64_t n, int64_t t, int64_t k) const {
    if (t >= m.rows || k >= m.columns) return acc_t(0);
    const int64_t b = n / m.groups, g = n % m.groups;
    return to_acc<acc_t>(
        m.data[b * m.batch_stride + g * m.group_stride + t * m.row_stride + k * m.column_stride]);
  }
  // Whether consecutive k are adjacent in memory (loads then walk k fastest).
  __device__ bool columns_contiguous() const { return m.column_stride == 1; }
};

template <typename scalar_t, typename acc_t>
struct PatchReader {
  PatchRows<scalar_t> m;
  __device__ int64_t rows() const { return m.out_h * m.out_w; }
  __device__ int64_t columns() const { return m.channels_per_group * m.kernel_h * m.kernel_w; }
  __device__ acc_t at(int64_t n, int64_t t, int64_t k) const {
    if (t >= rows() || k >= columns()) return acc_t(0);
    const int64_t b = n / m.groups, g = n % m.groups;
    const int64_t oy = t / m.out_w, ox = t % m.out_w;
    const int64_t kx = k % m.kernel_w, ky = (k / m.kernel_w) % m.kernel_h;
    const int64_t c = k / (m.kernel_w * m.kernel_h);
    const int64_t y = oy * m.stride_h + ky * m.dilation_h;
    const int64_t x = ox * m.stride_w + kx * m.dilation_w;
    return to_acc<acc_t>(
        m.data[b * m.batch_stride + (g * m.channels_per_group + c) * m.channel_stride +
               y * m.height_stride + x * m.width_stride]);
  }
  // Output positions are adjacent in memory along x when width_stride == 1.
  __device__ bool columns_contiguous() const { return false; }
};

// A reader seen as a matrix X(r, q) = reader(n, r, q) (rows: positions t,
// reduction: columns k), or transposed, X(r, q) = reader(n, q, r).
template <typename Reader, bool kTransposed>
struct Operand {
  Reader reader;
  __device__ int64_t reduction() const { return kTransposed ? reader.rows() : reader.columns(); }
  template <typename acc_t>
  __device__ acc_t at(int64_t n, int64_t r, int64_t q) const {
    return kTransposed ? reader.at(n, q, r) : reader.at(n, r, q);
  }
  // Whether q (the reduction index) is the fast-moving one in memory.
  __device__ bool reduction_contiguous() const {
    return kTransposed ? !reader.columns_contiguous() : reader.columns_contiguous();
  }
};

template <typename acc_t, typename X>
__device__ __forceinline__ void stage(const X& x, int64_t n, int64_t row0, int64_t q0,
                                      acc_t (&tile)[kStep][kTile]) {
  const bool q_fast = x.reduction_contiguous();
  for (int e = threadIdx.x; e < kStep * kTile; e += kThreads) {
    const int r = q_fast ? e / kStep : e % kTile;
    const int q = q_fast ? e % kStep : e / kTile;
    tile[q][r] = x.template at<acc_t>(n, row0 + r, q0 + q);
  }
}

// acc[i][j] += Σ_q X(row0 + ty + 16i, q) · Y(col0 + tx + 16j, q) over the whole
// reduction, for thread (ty, tx) = (threadIdx.x / 16, threadIdx.x % 16).
template <typename acc_t, typename X, typename Y>
__device__ void tile_product(const X& x, const Y& y, int64_t n, int64_t row0, int64_t col0,
                             acc_t (&acc)[kSub][kSub]) {
  __shared__ acc_t x_tile[kStep][kTile];
  __shared__ acc_t y_tile[kStep][kTile];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t reduction = x.reduction();
  for (int64_t q0 = 0; q0 < reduction; q0 += kStep) {
    stage(x, n, row0, q0, x_tile);
    stage(y, n, col0, q0, y_tile);
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kStep; ++q) {
      acc_t xv[kSub], yv[kSub];
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
        xv[i] = x_tile[q][ty + 16 * i];
        yv[i] = y_tile[q][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < kSub; ++i) {
#pragma unroll
        for (int j = 0; j < kSub; ++j) acc[i][j] += xv[i] * yv[j];
      }
    }
    __syncthreads();  // the tiles are overwritten by the next stage
  }
}

// Block-wide sum; the result is valid in thread 0 only.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value) {
  __shared__ acc_t partial[kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  value = warp_sum(value);
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  if (warp == 0) value = warp_sum(lane < kWarps ? partial[lane] : acc_t(0));
  __syncthreads();  // partial may be reused
  return value;
}

// The tiles of sample-group blockIdx.x are shared out over blockIdx.y in a
// grid-stride loop (the grid's y extent is at most 65535); each block writes the
// sum over its tiles to partials[n * gridDim.y + blockIdx.y].

// Tiles: 64×64 pieces of G_n = Σ_t g_t a_tᵀ over out_features × in_features,
// each squared and summed.
template <typename acc_t, typename A, typename G>
__global__ void __launch_bounds__(kThreads)
    materialise_kernel(A activations, G grads, int64_t column_tiles, int64_t tiles,
                       acc_t* __restrict__ partials) {
  const int64_t n = blockIdx.x;
  acc_t squares = 0;
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t row0 = tile / column_tiles * kTile, col0 = tile % column_tiles * kTile;
    acc_t acc[kSub][kSub] = {};
    tile_product(Operand<G, true>{grads}, Operand<A, true>{activations}, n, row0, col0, acc);
#pragma unroll
    for (int i = 0; i < kSub; ++i) {
#pragma unroll
      for (int j = 0; j < kSub; ++j) squares += acc[i][j] * acc[i][j];
    }
  }
  squares = block_sum(squares);
  if (threadIdx.x == 0) partials[n * gridDim.y + blockIdx.y] = squares;
}

// Tiles: pairs (i ≤ j) of 64-position tiles, each giving Σ ⟨a_t, a_s⟩⟨g_t, g_s⟩
// over t in tile i and s in tile j, doubled off the diagonal.
template <typename acc_t, typename A, typename G>
__global__ void __launch_bounds__(kThreads)
    ghost_kernel(A activations, G grads, int64_t position_tiles, int64_t tiles,
                 acc_t* __restrict__ partials) {
  const int64_t n = blockIdx.x;
  acc_t products = 0;
  for (int64_t pair = blockIdx.y; pair < tiles; pair += gridDim.y) {
    int64_t i = 0,
            first = 0;  // pair -> (i, j): row i of the triangle holds position_tiles - i pairs
    while (pair >= first + (position_tiles - i)) {
      first += position_tiles - i;
      ++i;
    }
    const int64_t j = i + (pair - first);
    acc_t gram_a[kSub][kSub] = {}, gram_g[kSub][kSub] = {};
    tile_product(Operand<A, false>{activations}, Operand<A, false>{activations}, n, i * kTile,
                 j * kTile, gram_a);
    tile_product(Operand<G, false>{grads}, Operand<G, false>{grads}, n, i * kTile, j * kTile,
                 gram_g);
    const acc_t weight = i == j ? acc_t(1) : acc_t(2);
#pragma unroll
    for (int r = 0; r < kSub; ++r) {
#pragma unroll
      for (int c = 0; c < kSub; ++c) products += weight * gram_a[r][c] * gram_g[r][c];
    }
  }
  products = block_sum(products);
  if (threadIdx.x == 0) partials[n * gridDim.y + blockIdx.y] = products;
}

// grid (samples): all of G_n (≤ kDirectOutputs entries) in registers, each
// thread summing over every kThreads-th position, then reduced over the block.
template <typename acc_t, typename A, typename G>
__global__ void __launch_bounds__(kThreads)
    direct_kernel(A activations, G grads, acc_t* __restrict__ partials) {
  constexpr int kOutputs = static_cast<int>(kDirectOutputs);
  __shared__ acc_t partial[kOutputs][kWarps];
  const int64_t n = blockIdx.x;
  const int64_t positions = activations.rows();
  const int64_t in_features = activations.columns();
  const int64_t outputs = in_features * grads.columns();
  acc_t acc[kOutputs] = {};
  for (int64_t t = threadIdx.x; t < positions; t += kThreads) {
#pragma unroll
    for (int o = 0; o < kOutputs; ++o) {
      if (o < outputs) {
        acc[o] += grads.at(n, t, o / in_features) * activations.at(n, t, o % in_features);
      }
    }
  }
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  warp_sum(acc);
  if (lane == 0) {
#pragma unroll
    for (int o = 0; o < kOutputs; ++o) partial[o][warp] = acc[o];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t squares = 0;
    for (int o = 0; o < outputs; ++o) {
      acc_t entry = 0;
      for (int w = 0; w < kWarps; ++w) entry += partial[o][w];
      squares += entry * entry;
    }
    partials[n] = squares;
  }
}

// out[b] = Σ over b's `per_sample` consecutive partials, in order.
template <typename acc_t>
__global__ void sum_partials_kernel(const acc_t* __restrict__ partials, int64_t batch,
                                    int64_t per_sample, acc_t* __restrict__ out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  acc_t total = 0;
  for (int64_t e = 0; e < per_sample; ++e) total += partials[b * per_sample + e];
  out[b] = total;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The grid's y limit. The emulated build (tests/cuda_emulation.py) lowers it to
// exercise the kernels' grid-stride loops on small problems.
#if !defined(GRADOOD_MAX_GRID_Y)
#define GRADOOD_MAX_GRID_Y 65535
#endif
constexpr int64_t kMaxGridY = GRADOOD_MAX_GRID_Y;

bool direct(int64_t activation_columns, int64_t grad_columns) {
  return activation_columns * grad_columns <= kDirectOutputs;
}

// Tiles of one sample-group's work for the method (see the kernels).
int64_t tiles_per_sample(int method, int64_t rows, int64_t activation_columns,
                         int64_t grad_columns) {
  if (method == kGhost) {
    const int64_t tiles = ceil_div(rows, kTile);
    return tiles * (tiles + 1) / 2;
  }
  if (direct(activation_columns, grad_columns)) return 1;
  return ceil_div(grad_columns, kTile) * ceil_div(activation_columns, kTile);
}

// Blocks per sample-group: one per tile, up to the grid's y limit.
int64_t blocks_per_sample(int method, int64_t rows, int64_t activation_columns,
                          int64_t grad_columns) {
  const int64_t tiles = tiles_per_sample(method, rows, activation_columns, grad_columns);
  return tiles < kMaxGridY ? tiles : kMaxGridY;
}

template <typename acc_t, typename A, typename G>
cudaError_t launch(const A& activations, const G& grads, int64_t batch, int64_t groups, int method,
                   int64_t rows, int64_t activation_columns, int64_t grad_columns, acc_t* workspace,
                   acc_t* out, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (method != kGhost && method != kMaterialise) return cudaErrorInvalidValue;
  const int64_t samples = batch * groups;
  if (samples > 0x7fffffffLL) return cudaErrorInvalidValue;  // grid.x limit
  if (rows == 0 || activation_columns == 0 || grad_columns == 0) {
    // Nothing to contract: every G_n is empty or zero.
    GRADOOD_LAUNCH(ceil_div(batch, kThreads), kThreads, stream, sum_partials_kernel<acc_t>)(
        workspace, batch, int64_t(0), out);
    return gradood_launch_status();
  }
  const int64_t tiles = tiles_per_sample(method, rows, activation_columns, grad_columns);
  const int64_t blocks = blocks_per_sample(method, rows, activation_columns, grad_columns);
  const dim3 grid(static_cast<unsigned>(samples), static_cast<unsigned>(blocks));
  if (method == kGhost) {
    GRADOOD_LAUNCH(grid, kThreads, stream, ghost_kernel<acc_t, A, G>)(
        activations, grads, ceil_div(rows, kTile), tiles, workspace);
  } else if (direct(activation_columns, grad_columns)) {
    GRADOOD_LAUNCH(grid, kThreads, stream, direct_kernel<acc_t, A, G>)(activations, grads,
                                                                       workspace);
  } else {
    GRADOOD_LAUNCH(grid, kThreads, stream, materialise_kernel<acc_t, A, G>)(
        activations, grads, ceil_div(activation_columns, kTile), tiles, workspace);
  }
  const cudaError_t status = gradood_launch_status();
  if (status != cudaSuccess) return status;
  GRADOOD_LAUNCH(ceil_div(batch, kThreads), kThreads, stream, sum_partials_kernel<acc_t>)(
      workspace, batch, groups * blocks, out);
  return gradood_launch_status();
}

}  // namespace

int64_t sq_norm_workspace_size(int method, int64_t samples, int64_t rows,
                               int64_t activation_columns, int64_t grad_columns) {
  if (rows == 0 || activation_columns == 0 || grad_columns == 0) return 0;
  return samples * blocks_per_sample(method, rows, activation_columns, grad_columns);
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_outer_product_sq_norm(const DenseRows<scalar_t>& activations,
                                         const DenseRows<scalar_t>& grads, int64_t batch,
                                         int method, acc_t* workspace, acc_t* out,
                                         cudaStream_t stream) {
  return launch(DenseReader<scalar_t, acc_t>{activations}, DenseReader<scalar_t, acc_t>{grads},
                batch, activations.groups, method, activations.rows, activations.columns,
                grads.columns, workspace, out, stream);
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_conv2d_weight_sq_norm(const PatchRows<scalar_t>& patches,
                                         const DenseRows<scalar_t>& grads, int64_t batch,
                                         int method, acc_t* workspace, acc_t* out,
                                         cudaStream_t stream) {
  return launch(PatchReader<scalar_t, acc_t>{patches}, DenseReader<scalar_t, acc_t>{grads}, batch,
                patches.groups, method, patches.out_h * patches.out_w,
                patches.channels_per_group * patches.kernel_h * patches.kernel_w, grads.columns,
                workspace, out, stream);
}

#define GRADOOD_INSTANTIATE_SQ_NORMS(scalar_t, acc_t)                                       \
  template cudaError_t launch_outer_product_sq_norm<scalar_t, acc_t>(                       \
      const DenseRows<scalar_t>&, const DenseRows<scalar_t>&, int64_t, int, acc_t*, acc_t*, \
      cudaStream_t);                                                                        \
  template cudaError_t launch_conv2d_weight_sq_norm<scalar_t, acc_t>(                       \
      const PatchRows<scalar_t>&, const DenseRows<scalar_t>&, int64_t, int, acc_t*, acc_t*, \
      cudaStream_t);

GRADOOD_INSTANTIATE_SQ_NORMS(float, float)
GRADOOD_INSTANTIATE_SQ_NORMS(__half, float)
GRADOOD_INSTANTIATE_SQ_NORMS(__nv_bfloat16, float)
GRADOOD_INSTANTIATE_SQ_NORMS(double, double)

#undef GRADOOD_INSTANTIATE_SQ_NORMS

}  // namespace cuda
}  // namespace gradood
