// A host emulator for the subset of CUDA that regkern's kernels use, so the very sources in csrc/*.cu run on the
// CPU (tests/ops/test_cuda_emulated.py). Each block runs as blockDim.x std::threads, blocks one after another:
//   __shared__          -> static storage (one block at a time, so every thread of the block sees the same array)
//   __syncthreads()     -> a barrier of the block's threads
//   __shfl_xor_sync     -> an exchange through a per-warp buffer between two barriers of the warp's 32 threads
//   mma.sync m16n8k16   -> every lane posts its A/B fragments, then computes its own C elements from the whole
//                          warp's, by the PTX ISA's fragment layout (row-major A, column-major B, f32 accumulate)
//   ldmatrix.x4[.trans] -> every lane posts its row address, then gathers its elements by the PTX layout
//   cp.async            -> copies queued per thread and carried out at cp.async.wait_group, group by group, so a
//                          kernel that reads shared memory before waiting sees stale data here too
//   dynamic shared mem  -> one buffer per block
// Every lane of a warp must reach each shuffle/mma/ldmatrix, as on the GPU with a full mask. Not a performance model.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
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
  Block(unsigned threads, size_t dynamic_bytes)
      : sync(static_cast<std::ptrdiff_t>(threads)),
        exchange((threads + 31) / 32 * 32 * 8, 0u),
        dynamic((dynamic_bytes + 15) / 16) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
      const unsigned lanes = std::min(32u, threads - 32 * w);
      warps.push_back(std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(lanes)));
    }
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint32_t> exchange;  // 8 words per thread: shuffle values, mma fragments, ldmatrix addresses
  std::vector<uint4> dynamic;      // dynamic shared memory
  std::atomic<bool> unfinished_copies{false};
};

struct PendingCopy {
  void* dst;
  const void* src;
  int bytes;
};

inline thread_local Index thread_index, block_index;
inline Index grid_dim, block_dim;
inline thread_local Block* current_block = nullptr;
inline thread_local std::vector<PendingCopy> open_group;
inline thread_local std::vector<std::vector<PendingCopy>> committed_groups;

inline uint4* dynamic_smem() { return current_block->dynamic.data(); }

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

inline void cp_async_16(void* dst, const void* src, int src_bytes) { open_group.push_back({dst, src, src_bytes}); }

inline void cp_async_commit() {
  committed_groups.push_back(std::move(open_group));
  open_group.clear();
}

inline void cp_async_wait(int pending) {
  while (static_cast<int>(committed_groups.size()) > pending) {
    for (const PendingCopy& c : committed_groups.front()) {
      std::memset(c.dst, 0, 16);
      if (c.bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
    }
    committed_groups.erase(committed_groups.begin());
  }
}

inline uint16_t load16(const void* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_address, bool transpose) {
  const unsigned me = linear_thread();
  const uintptr_t mine = reinterpret_cast<uintptr_t>(row_address);
  std::memcpy(slot(me), &mine, sizeof(mine));
  warp_sync();
  const unsigned base = me & ~31u;
  const int lane = static_cast<int>(me & 31u);
  auto row = [&](int matrix, int r) {
    uintptr_t a;
    std::memcpy(&a, slot(base + 8 * matrix + r), sizeof(a));
    return reinterpret_cast<const unsigned char*>(a);
  };
  for (int i = 0; i < 4; ++i) {
    uint32_t lo, hi;
    if (!transpose) {  // row lane / 4, elements 2 * (lane % 4) and + 1
      lo = load16(row(i, lane / 4) + 2 * (2 * (lane % 4)));
      hi = load16(row(i, lane / 4) + 2 * (2 * (lane % 4) + 1));
    } else {  // rows 2 * (lane % 4) and + 1, element lane / 4
      lo = load16(row(i, 2 * (lane % 4)) + 2 * (lane / 4));
      hi = load16(row(i, 2 * (lane % 4) + 1) + 2 * (lane / 4));
    }
    r[i] = lo | (hi << 16);
  }
  warp_sync();
}

// Run kernel(args...) over grid x block (with dynamic_bytes of dynamic shared memory), one block at a time.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t dynamic_bytes, Kernel kernel, const Args&... args) {
  if (block.y != 1 || block.z != 1) throw std::runtime_error("emulator: 1-D blocks only");
  grid_dim = {grid.x, grid.y, grid.z};
  block_dim = {block.x, 1, 1};
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block state(block.x, dynamic_bytes);
        std::vector<std::thread> threads;
        threads.reserve(block.x);
        for (unsigned t = 0; t < block.x; ++t) {
          threads.emplace_back([&, t] {
            thread_index = {t, 0, 0};
            block_index = {x, y, z};
            current_block = &state;
            kernel(args...);
            if (!committed_groups.empty() || !open_group.empty()) {  // reported after the join
              committed_groups.clear();
              open_group.clear();
              state.unfinished_copies = true;
            }
          });
        }
        for (auto& th : threads) th.join();
        if (state.unfinished_copies) {
          throw std::runtime_error("emulator: a thread finished with cp.async copies it never waited for");
        }
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
