// LayerNorm forward with norm capture (the op behind MonitoredLayerNorm on the "cuda" backend).
//
// One warp per row: float32 mean, then the centred variance and the raw sum of squares (the input token's L2 norm,
// where high-norm artifacts show) in a second pass, then y = (x - mean) * rstd * weight + bias rounded once.
// Rows are read 8 elements (16 or 32 bytes) at a time when C % 8 == 0 and the rows are aligned, and kept in
// registers between the passes up to C = 2048.
#include "regkern.h"

#include "cuda_launch.cuh"

#include <cstdint>
#include <cstring>

namespace regkern {
namespace {

constexpr int kRowsPerBlock = 4;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_normalized(T* dst, const float (&f)[VEC], int c, float mean, float rstd,
                                                 const float* __restrict__ weight, const float* __restrict__ bias) {
  float out[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    float val = (f[i] - mean) * rstd;
    if (weight != nullptr) val *= weight[c + i];
    if (bias != nullptr) val += bias[c + i];
    out[i] = val;
  }
  store_vec<T, VEC>(dst, out);
}

// kCached > 0: each lane keeps its kCached chunks of the row in registers, so the row is read from memory once
// (C <= 32 * VEC * kCached); kCached = 0: any C, the row is read three times (the later passes mostly from cache).
template <typename T, int VEC, int kCached>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    layer_norm_fwd_kernel(const T* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
                          T* __restrict__ y, float* __restrict__ norms, float* __restrict__ mean_out,
                          float* __restrict__ rstd_out, int64_t rows, int C, float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps leave together: the shuffles below see all 32 lanes
  const T* xr = x + row * C;
  T* yr = y + row * C;
  constexpr int kStep = 32 * VEC;

  float mean, rstd, squares = 0.f, centred = 0.f, sum = 0.f;
  if constexpr (kCached > 0) {
    float f[kCached][VEC];
#pragma unroll
    for (int i = 0; i < kCached; ++i) {
      const int c = i * kStep + lane * VEC;
      if (c < C) {
        load_vec<T, VEC>(xr + c, f[i]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) f[i][e] = 0.f;  // zeros add nothing to the sums
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum += f[i][e];
    }
    mean = warp_sum(sum) / C;
#pragma unroll
    for (int i = 0; i < kCached; ++i) {
      if (i * kStep + lane * VEC >= C) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float diff = f[i][e] - mean;
        centred += diff * diff;
        squares += f[i][e] * f[i][e];
      }
    }
    rstd = rsqrtf(warp_sum(centred) / C + eps);
#pragma unroll
    for (int i = 0; i < kCached; ++i) {
      const int c = i * kStep + lane * VEC;
      if (c < C) store_normalized<T, VEC>(yr + c, f[i], c, mean, rstd, weight, bias);
    }
  } else {
    for (int c = lane * VEC; c < C; c += kStep) {
      float f[VEC];
      load_vec<T, VEC>(xr + c, f);
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum += f[e];
    }
    mean = warp_sum(sum) / C;
    for (int c = lane * VEC; c < C; c += kStep) {
      float f[VEC];
      load_vec<T, VEC>(xr + c, f);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float diff = f[e] - mean;
        centred += diff * diff;
        squares += f[e] * f[e];
      }
    }
    rstd = rsqrtf(warp_sum(centred) / C + eps);
    for (int c = lane * VEC; c < C; c += kStep) {
      float f[VEC];
      load_vec<T, VEC>(xr + c, f);
      store_normalized<T, VEC>(yr + c, f, c, mean, rstd, weight, bias);
    }
  }
  squares = warp_sum(squares);
  if (lane == 0) {
    norms[row] = sqrtf(squares);
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename T>
void launch(const at::Tensor& x, const float* w, const float* b, at::Tensor& y, at::Tensor& norms, at::Tensor& mean,
            at::Tensor& rstd, int64_t rows, int C, float eps, regkern_stream_t stream) {
  const dim3 grid(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  T* yp = reinterpret_cast<T*>(y.data_ptr());
  const bool vec = C % 8 == 0 && reinterpret_cast<uintptr_t>(xp) % 16 == 0;  // y is a fresh allocation
  // rows held in registers up to C = 1024 (ViT-S/B/L) or 2048 (ViT-g), 8 elements per load
  auto kernel = !vec              ? layer_norm_fwd_kernel<T, 1, 0>
                : C <= 32 * 8 * 4 ? layer_norm_fwd_kernel<T, 8, 4>
                : C <= 32 * 8 * 8 ? layer_norm_fwd_kernel<T, 8, 8>
                                  : layer_norm_fwd_kernel<T, 8, 0>;
  REGKERN_LAUNCH(kernel, grid, kRowsPerBlock * 32, stream, xp, w, b, yp, norms.data_ptr<float>(),
                 mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, C, eps);
  REGKERN_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x_in,
                                                                               const OptTensor& weight,
                                                                               const OptTensor& bias, double eps) {
  const int64_t C = check_layer_norm_args(x_in, weight, bias, eps);
  REGKERN_DEVICE_CHECK(x_in, "x");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "x: the CUDA LayerNorm kernel supports float16, bfloat16 and float32, got ", dtype);
  TORCH_CHECK(C < (int64_t(1) << 30), "x: last dim C = ", C, " is too large");
  REGKERN_DEVICE_GUARD(x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.numel() / C;
  // affine parameters as float32 (C,): tiny, and one kernel then serves every parameter dtype
  const at::Tensor w = weight.has_value() ? weight->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  auto y = new_output(x.sizes(), x.options());
  auto stat_shape = x.sizes().slice(0, x.dim() - 1);
  auto f32 = x.options().dtype(at::kFloat);
  auto norms = new_output(stat_shape, f32), mean = new_output(stat_shape, f32), rstd = new_output(stat_shape, f32);
  if (rows > 0) {
    TORCH_CHECK(rows / kRowsPerBlock < (int64_t(1) << 31) - 1, "x: too many rows (", rows, ")");
    regkern_stream_t stream = REGKERN_STREAM;
    const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    const int c = static_cast<int>(C);
    const float e = static_cast<float>(eps);
    if (dtype == at::kHalf) {
      launch<__half>(x, wp, bp, y, norms, mean, rstd, rows, c, e, stream);
    } else if (dtype == at::kBFloat16) {
      launch<__nv_bfloat16>(x, wp, bp, y, norms, mean, rstd, rows, c, e, stream);
    } else {
      launch<float>(x, wp, bp, y, norms, mean, rstd, rows, c, e, stream);
    }
  }
  return {y, norms, mean, rstd};
}

}  // namespace regkern
