// What the .cu files need from the CUDA runtime, in one place: device checks, the device guard, the current stream,
// kernel launches. With REGKERN_EMULATE the same sources compile for the host emulator (emulation/), which runs the
// kernels thread by thread on CPU tensors so CI can execute them without a GPU.
#pragma once

#ifdef REGKERN_EMULATE
#include "emulation/cuda_emulator.h"

#define REGKERN_DEVICE_CHECK(t, name) \
  TORCH_CHECK((t).is_cpu(), name ": expected a CPU tensor for the emulated kernel, got device ", (t).device())
#define REGKERN_DEVICE_GUARD(t)
#define REGKERN_STREAM nullptr
#define REGKERN_LAUNCH(kernel, grid, block, stream, ...) regkern_emu::launch(grid, block, 0, kernel, __VA_ARGS__)
#define REGKERN_LAUNCH_SMEM(kernel, grid, block, smem_bytes, stream, ...) \
  regkern_emu::launch(grid, block, smem_bytes, kernel, __VA_ARGS__)
#define REGKERN_ALLOW_DYNAMIC_SMEM(kernel, smem_bytes)
#define REGKERN_DYNAMIC_SMEM(name) uint4* name = regkern_emu::dynamic_smem()
#define REGKERN_LAUNCH_CHECK()
// two "multiprocessors": grids sized by the SM count stay small, so each emulated block loops over several rows
#define REGKERN_MULTIPROCESSORS() 2
using regkern_stream_t = void*;
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define REGKERN_DEVICE_CHECK(t, name) \
  TORCH_CHECK((t).is_cuda(), name ": expected a CUDA tensor for the CUDA kernel, got device ", (t).device())
#define REGKERN_DEVICE_GUARD(t) const c10::cuda::CUDAGuard regkern_device_guard((t).device())
#define REGKERN_STREAM c10::cuda::getCurrentCUDAStream()
#define REGKERN_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define REGKERN_LAUNCH_SMEM(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<grid, block, smem_bytes, stream>>>(__VA_ARGS__)
// dynamic shared memory above the 48 KiB default needs an opt-in per kernel
#define REGKERN_ALLOW_DYNAMIC_SMEM(kernel, smem_bytes) \
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_bytes)))
#define REGKERN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) uint4 name[]
#define REGKERN_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define REGKERN_MULTIPROCESSORS() regkern::current_multiprocessors()
using regkern_stream_t = cudaStream_t;
namespace regkern {
// SM count of the current device (an attribute query: no synchronisation, allowed during CUDA-graph capture)
inline int current_multiprocessors() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}
}  // namespace regkern
#endif

#include <cstdint>
#include <cstring>

namespace regkern {

// float <-> storage type conversions shared by the kernels
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---- VEC consecutive elements as float: VEC = 8 moves 16 bytes of 16-bit types (32 of float) per access and needs
// 16-byte aligned addresses; VEC = 1 any address. The copy between uint4 words and typed elements is a register move
// (memcpy), never a type-punned access.
template <typename T, int VEC>
struct Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[VEC]) {
  Vec<T, VEC> raw;
  if constexpr (VEC == 1) {
    raw.v[0] = *p;
  } else {
    constexpr int kWords = sizeof(Vec<T, VEC>) / 16;
    uint4 words[kWords];
#pragma unroll
    for (int w = 0; w < kWords; ++w) words[w] = reinterpret_cast<const uint4*>(p)[w];
    memcpy(&raw, words, sizeof(raw));
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) f[i] = to_float(raw.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[VEC]) {
  Vec<T, VEC> raw;
#pragma unroll
  for (int i = 0; i < VEC; ++i) raw.v[i] = from_float<T>(f[i]);
  if constexpr (VEC == 1) {
    *p = raw.v[0];
  } else {
    constexpr int kWords = sizeof(Vec<T, VEC>) / 16;
    uint4 words[kWords];
    memcpy(words, &raw, sizeof(raw));
#pragma unroll
    for (int w = 0; w < kWords; ++w) reinterpret_cast<uint4*>(p)[w] = words[w];
  }
}

// ---- asynchronous copies and matrix loads (sm_80+); the emulator has host versions with the same semantics ----

// 16-byte global -> shared copy in flight until cp_async_wait; src_bytes = 0 writes 16 zero bytes instead
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
#ifdef REGKERN_EMULATE
  regkern_emu::cp_async_16(smem, gmem, src_bytes);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_bytes) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef REGKERN_EMULATE
  regkern_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// wait until at most `kPending` committed groups of this thread are still in flight
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef REGKERN_EMULATE
  regkern_emu::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Four 8x8 matrices of 16-bit elements from shared memory: lane 8 * i + r gives the address of row r of matrix i;
// register i of lane l receives elements (l / 4, 2 * (l % 4) + {0, 1}) of matrix i, or with the transpose
// variant elements (2 * (l % 4) + {0, 1}, l / 4) (the low half holds the first).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#ifdef REGKERN_EMULATE
  regkern_emu::ldmatrix_x4(r, smem_row, false);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#ifdef REGKERN_EMULATE
  regkern_emu::ldmatrix_x4(r, smem_row, true);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// ---- atomics on global or shared memory (the emulator's: std::atomic_ref, its threads being real threads) ----
__device__ __forceinline__ void atomic_add(int64_t* p, int64_t v) {
#ifdef REGKERN_EMULATE
  std::atomic_ref<int64_t>(*p).fetch_add(v);
#else
  atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));  // two's complement
#endif
}

__device__ __forceinline__ void atomic_add(int* p, int v) {
#ifdef REGKERN_EMULATE
  std::atomic_ref<int>(*p).fetch_add(v);
#else
  atomicAdd(p, v);
#endif
}

__device__ __forceinline__ void atomic_add(double* p, double v) {
#ifdef REGKERN_EMULATE
  double seen = std::atomic_ref<double>(*p).load();
  while (!std::atomic_ref<double>(*p).compare_exchange_weak(seen, seen + v)) {
  }
#else
  atomicAdd(p, v);  // sm_60+
#endif
}

// max of non-negative floats: their bit patterns order as signed integers do (a quiet NaN's above them all)
__device__ __forceinline__ void atomic_max_nonnegative(float* p, float v) {
#ifdef REGKERN_EMULATE
  float seen = std::atomic_ref<float>(*p).load();
  // as the GPU's integer max of the bit patterns: a NaN (0x7fc00000) wins over every finite value
  int32_t mine, theirs;
  memcpy(&mine, &v, 4);
  memcpy(&theirs, &seen, 4);
  while (theirs < mine && !std::atomic_ref<float>(*p).compare_exchange_weak(seen, v)) {
    memcpy(&theirs, &seen, 4);
  }
#else
  atomicMax(reinterpret_cast<int*>(p), __float_as_int(v));
#endif
}

}  // namespace regkern
