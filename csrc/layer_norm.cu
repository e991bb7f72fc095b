// LayerNorm forward with norm capture (the op behind MonitoredLayerNorm on the "cuda" backend).
//
// One warp per row: float32 mean, then the centred variance and the raw sum of squares (the input token's L2 norm,
// where high-norm artifacts show) in a second pass, then y = (x - mean) * rstd * weight + bias rounded once.
// Rows of 16-bit values are read 8 elements (16 bytes) at a time when C % 8 == 0 and the rows are aligned.
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

// VEC elements per access: 8 (16-byte loads of 16-bit types, two of float) or 1
template <typename T, int VEC>
struct Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, float (&f)[VEC]) {
  Vec<T, VEC> raw;
  if constexpr (VEC == 1) {
    raw.v[0] = *p;
  } else {
    // 16-byte global loads, then a register copy into the typed elements (no type-punned access)
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
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    layer_norm_fwd_kernel(const T* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
                          T* __restrict__ y, float* __restrict__ norms, float* __restrict__ mean_out,
                          float* __restrict__ rstd_out, int64_t rows, int C, float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const T* xr = x + row * C;
  T* yr = y + row * C;
  constexpr int kStep = 32 * VEC;

  float sum = 0.f;
  for (int c = lane * VEC; c < C; c += kStep) {
    float f[VEC];
    load<T, VEC>(xr + c, f);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum += f[i];
  }
  const float mean = warp_sum(sum) / C;
  float centred = 0.f, squares = 0.f;
  for (int c = lane * VEC; c < C; c += kStep) {
    float f[VEC];
    load<T, VEC>(xr + c, f);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float diff = f[i] - mean;
      centred += diff * diff;
      squares += f[i] * f[i];
    }
  }
  const float rstd = rsqrtf(warp_sum(centred) / C + eps);
  squares = warp_sum(squares);
  for (int c = lane * VEC; c < C; c += kStep) {
    float f[VEC];
    load<T, VEC>(xr + c, f);
    Vec<T, VEC> out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float val = (f[i] - mean) * rstd;
      if (weight != nullptr) val *= weight[c + i];
      if (bias != nullptr) val += bias[c + i];
      out.v[i] = from_float<T>(val);
    }
    if constexpr (VEC == 1) {
      yr[c] = out.v[0];
    } else {
      constexpr int kWords = sizeof(Vec<T, VEC>) / 16;
      uint4 words[kWords];
      memcpy(words, &out, sizeof(out));
#pragma unroll
      for (int w = 0; w < kWords; ++w) reinterpret_cast<uint4*>(yr + c)[w] = words[w];
    }
  }
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
  if (vec) {
    auto kernel = layer_norm_fwd_kernel<T, 8>;
    REGKERN_LAUNCH(kernel, grid, kRowsPerBlock * 32, stream, xp, w, b, yp, norms.data_ptr<float>(),
                   mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, C, eps);
  } else {
    auto kernel = layer_norm_fwd_kernel<T, 1>;
    REGKERN_LAUNCH(kernel, grid, kRowsPerBlock * 32, stream, xp, w, b, yp, norms.data_ptr<float>(),
                   mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, C, eps);
  }
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
