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
#define REGKERN_LAUNCH(kernel, grid, block, stream, ...) regkern_emu::launch(grid, block, kernel, __VA_ARGS__)
#define REGKERN_LAUNCH_CHECK()
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
#define REGKERN_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
using regkern_stream_t = cudaStream_t;
#endif

#include <cstdint>

namespace regkern {

// float <-> storage type conversions shared by the kernels
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

}  // namespace regkern
