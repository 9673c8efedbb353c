// A CPU emulation of the CUDA execution model, for testing the kernels in
// csrc/cuda on machines without a GPU. Compiling a .cu file with a host C++
// compiler (g++ -x c++ -std=c++20) routes its kernels here through
// csrc/cuda/device.h: each launch runs every block of the grid in turn, each
// thread of a block as an OS thread, with
//   * __syncthreads()         a barrier over the block's threads,
//   * __shfl_*_sync/__syncwarp a barrier over the warp's threads plus an
//                             exchange slot per lane (so a divergent warp
//                             collective deadlocks here, as it is undefined
//                             behaviour on the device),
//   * __shared__              a function-local static: blocks run one after
//                             the other, and a barrier separates them,
//   * atomicAdd               std::atomic_ref.
// Launch configurations are validated like the device does (block size,
// grid limits), and the error is returned by the launcher's status call.
// What it cannot show: timing, the memory model of the device (every access
// here is sequentially consistent enough), bank conflicts, register limits.
// Kernels that rely on implicit warp lock-step (no __syncwarp) are wrong on
// the device and may pass here.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emulation.h is for host compilers only"
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace gradood {
namespace emulation {

constexpr unsigned kWarpSize = 32;

struct Warp {
  explicit Warp(unsigned size) : barrier(size) {}
  std::barrier<> barrier;
  alignas(16) unsigned char slots[kWarpSize][16];
};

struct Block {
  explicit Block(unsigned threads) : barrier(threads) {
    for (unsigned first = 0; first < threads; first += kWarpSize) {
      const unsigned size = threads - first < kWarpSize ? threads - first : kWarpSize;
      warps.push_back(std::make_unique<Warp>(size));
    }
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};

struct ThreadState {
  dim3 thread{0, 0, 0};
  dim3 block{0, 0, 0};
  dim3 block_dim{1, 1, 1};
  dim3 grid_dim{1, 1, 1};
  Block* context = nullptr;
  unsigned linear = 0;  // thread index within the block, x fastest
};

inline thread_local ThreadState current;
inline thread_local cudaError_t last_error = cudaSuccess;

inline Warp& warp() { return *current.context->warps[current.linear / kWarpSize]; }
inline unsigned lane() { return current.linear % kWarpSize; }

template <typename T>
T exchange(T value, int source_lane, bool keep_own) {
  static_assert(sizeof(T) <= 16, "shuffle of a type over 16 bytes");
  Warp& w = warp();
  std::memcpy(w.slots[lane()], &value, sizeof(T));
  w.barrier.arrive_and_wait();
  T result = value;
  if (!keep_own) std::memcpy(&result, w.slots[source_lane], sizeof(T));
  w.barrier.arrive_and_wait();  // nobody overwrites a slot before all have read
  return result;
}

inline unsigned warp_threads() {
  const unsigned threads = current.block_dim.x * current.block_dim.y * current.block_dim.z;
  const unsigned first = current.linear - lane();
  return threads - first < kWarpSize ? threads - first : kWarpSize;
}

inline bool valid_config(dim3 grid, dim3 block) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  return threads >= 1 && threads <= 1024 && block.z <= 64 && grid.x >= 1 && grid.y >= 1 &&
         grid.z >= 1 && grid.y <= 65535 && grid.z <= 65535 && grid.x <= 0x7fffffffu;
}

// Runs kernel(args...) over the grid; threads are created once per launch and
// walk the blocks in order, with a barrier between blocks.
template <typename Kernel, typename... Args>
void run(Kernel kernel, dim3 grid, dim3 block, Args... args) {
  if (!valid_config(grid, block)) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const unsigned threads = block.x * block.y * block.z;
  Block context(threads);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      current.context = &context;
      current.linear = t;
      current.block_dim = block;
      current.grid_dim = grid;
      current.thread = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            current.block = dim3(x, y, z);
            kernel(args...);
            context.barrier.arrive_and_wait();
          }
    });
  }
  for (auto& worker : workers) worker.join();
  last_error = cudaSuccess;
}

template <typename Kernel>
struct Launcher {
  Kernel kernel;
  dim3 grid, block;
  template <typename... Args>
  void operator()(Args... args) const {
    run(kernel, grid, block, args...);
  }
};

template <typename Kernel>
Launcher<Kernel> launcher(Kernel kernel, dim3 grid, dim3 block) {
  return Launcher<Kernel>{kernel, grid, block};
}

inline cudaError_t take_last_error() {
  const cudaError_t error = last_error;
  last_error = cudaSuccess;
  return error;
}

}  // namespace emulation
}  // namespace gradood

#define threadIdx (::gradood::emulation::current.thread)
#define blockIdx (::gradood::emulation::current.block)
#define blockDim (::gradood::emulation::current.block_dim)
#define gridDim (::gradood::emulation::current.grid_dim)
#define warpSize 32

inline void __syncthreads() { ::gradood::emulation::current.context->barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  ::gradood::emulation::warp().barrier.arrive_and_wait();
}

template <typename T>
T __shfl_sync(unsigned, T value, int source, int width = 32) {
  const int base = static_cast<int>(::gradood::emulation::lane()) / width * width;
  return ::gradood::emulation::exchange(value, base + source % width, false);
}
template <typename T>
T __shfl_down_sync(unsigned, T value, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(::gradood::emulation::lane());
  const int source = lane + static_cast<int>(delta);
  const bool outside = source / width != lane / width ||
                       source >= static_cast<int>(::gradood::emulation::warp_threads());
  return ::gradood::emulation::exchange(value, outside ? lane : source, outside);
}
template <typename T>
T __shfl_xor_sync(unsigned, T value, int mask, int width = 32) {
  const int lane = static_cast<int>(::gradood::emulation::lane());
  const int source = lane ^ mask;
  const bool outside = source / width != lane / width ||
                       source >= static_cast<int>(::gradood::emulation::warp_threads());
  return ::gradood::emulation::exchange(value, outside ? lane : source, outside);
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

template <typename T>
T __ldg(const T* address) {
  return *address;
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float x, float y) { return x / y; }
