// A host emulator for the subset of CUDA that regkern's kernels use, so the very sources in csrc/*.cu run on the
// CPU (tests/test_cuda_emulated.py). Each block runs as blockDim.x std::threads, blocks one after another:
//   __shared__          -> static storage (one block at a time, so every thread of the block sees the same array)
//   __syncthreads()     -> a barrier of the block's threads
//   __shfl_xor_sync     -> an exchange through a per-warp buffer between two barriers of the warp's 32 threads
//   mma.sync m16n8k16   -> every lane posts its A/B fragments, then computes its own C elements from the whole
//                          warp's, by the PTX ISA's fragment layout (row-major A, column-major B, f32 accumulate)
// Every lane of a warp must reach each shuffle/mma, as on the GPU with a full mask. Not a performance model.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#undef __global__
#define __global__
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#ifndef __align__
#define __align__(n) __attribute__((aligned(n)))
#endif

using std::max;
using std::min;
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

namespace regkern_emu {

struct Index {
  unsigned x = 0, y = 0, z = 0;
};

struct Block {
  explicit Block(unsigned threads)
      : sync(static_cast<std::ptrdiff_t>(threads)), exchange((threads + 31) / 32 * 32 * 8, 0u) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
      const unsigned lanes = std::min(32u, threads - 32 * w);
      warps.push_back(std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(lanes)));
    }
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint32_t> exchange;  // 8 words per thread: shuffle values and mma fragments
};

inline thread_local Index thread_index, block_index;
inline Index grid_dim, block_dim;
inline thread_local Block* current_block = nullptr;

inline unsigned linear_thread() { return thread_index.x; }
inline uint32_t* slot(unsigned thread) { return &current_block->exchange[thread * 8]; }
inline void warp_sync() { current_block->warps[linear_thread() / 32]->arrive_and_wait(); }

template <typename T>
T shfl_xor(T value, int lane_mask) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  const unsigned me = linear_thread();
  std::memcpy(slot(me), &value, 4);
  warp_sync();
  const unsigned other = (me & ~31u) | ((me & 31u) ^ static_cast<unsigned>(lane_mask));
  T result;
  std::memcpy(&result, slot(other), 4);
  warp_sync();
  return result;
}

inline float half_bits_to_float(uint16_t bits, __half*) {
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}
inline float half_bits_to_float(uint16_t bits, __nv_bfloat16*) {
  __nv_bfloat16 h;
  std::memcpy(&h, &bits, 2);
  return __bfloat162float(h);
}

// element e (0 = low half, 1 = high half) of a 32-bit fragment register, as float
template <typename T>
float element(uint32_t reg, int e) {
  return half_bits_to_float(static_cast<uint16_t>(e ? reg >> 16 : reg & 0xffffu), static_cast<T*>(nullptr));
}

// D = A (16x16, row) * B (16x8, col) + C, fragments per the PTX ISA (mma.m16n8k16, .f16/.bf16 inputs, .f32 acc)
template <typename T>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const unsigned me = linear_thread();
  uint32_t* mine = slot(me);
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0;
  mine[5] = b1;
  warp_sync();
  const unsigned base = me & ~31u;
  // A(row, k): held by lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 * (k >= 8), half k % 2
  auto A = [&](int row, int k) {
    const unsigned lane = (row % 8) * 4 + (k % 8) / 2;
    return element<T>(slot(base + lane)[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2);
  };
  // B(k, n): held by lane n * 4 + (k % 8) / 2, register 4 + (k >= 8) (b0 / b1), half k % 2
  auto B = [&](int k, int n) {
    const unsigned lane = n * 4 + (k % 8) / 2;
    return element<T>(slot(base + lane)[4 + (k >= 8 ? 1 : 0)], k % 2);
  };
  const int lane = static_cast<int>(me & 31u), group = lane / 4, thread_in_group = lane % 4;
  float d[4];
  for (int e = 0; e < 4; ++e) {  // C/D(row, col): c0, c1 at (group, 2t + 0/1), c2, c3 at (group + 8, 2t + 0/1)
    const int row = group + (e >= 2 ? 8 : 0), col = 2 * thread_in_group + (e % 2);
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
    d[e] = c[e] + sum;
  }
  warp_sync();
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

// Run kernel(args...) over grid x block, one block at a time.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, const Args&... args) {
  if (block.y != 1 || block.z != 1) throw std::runtime_error("emulator: 1-D blocks only");
  grid_dim = {grid.x, grid.y, grid.z};
  block_dim = {block.x, 1, 1};
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block state(block.x);
        std::vector<std::thread> threads;
        threads.reserve(block.x);
        for (unsigned t = 0; t < block.x; ++t) {
          threads.emplace_back([&, t] {
            thread_index = {t, 0, 0};
            block_index = {x, y, z};
            current_block = &state;
            kernel(args...);
          });
        }
        for (auto& th : threads) th.join();
      }
    }
  }
}

}  // namespace regkern_emu

#define threadIdx (regkern_emu::thread_index)
#define blockIdx (regkern_emu::block_index)
#define gridDim (regkern_emu::grid_dim)
#define blockDim (regkern_emu::block_dim)

inline void __syncthreads() { regkern_emu::current_block->sync.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  return regkern_emu::shfl_xor(value, lane_mask);
}
