// LayerNorm forward with norm capture (the op behind MonitoredLayerNorm on the "cuda" backend).
//
// One warp per row: float32 mean, then the centred variance and the raw sum of squares (the input token's L2 norm,
// where high-norm artifacts show) in a second pass, then y = (x - mean) * rstd * weight + bias rounded once.
// Rows are read 8 elements (16 or 32 bytes) at a time when C % 8 == 0 and the rows are aligned, and kept in
// registers between the passes up to C = 2048.
//
// The monitored forward (MonitoredLayerNorm with a NormMonitor) also reduces the token norms per group into the
// monitor's buffers in the same pass: the CUDA twin of the Triton kernel ln_fwd_monitored_kernel.
#include "regkern.h"

#include "cuda_launch.cuh"

#include <algorithm>
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

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One row by one warp: y = (x - mean) * rstd * weight + bias; returns the row's raw sum of squares (all lanes).
// kCached > 0: each lane keeps its kCached chunks of the row in registers, so the row is read from memory once
// (C <= 32 * VEC * kCached); kCached = 0: any C, the row is read three times (the later passes mostly from cache).
template <typename T, int VEC, int kCached>
__device__ __forceinline__ float normalize_row(const T* __restrict__ xr, T* __restrict__ yr,
                                               const float* __restrict__ weight, const float* __restrict__ bias, int C,
                                               float eps, int lane, float& mean, float& rstd) {
  constexpr int kStep = 32 * VEC;
  float squares = 0.f, centred = 0.f, sum = 0.f;
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
  return warp_sum(squares);
}

template <typename T, int VEC, int kCached>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    layer_norm_fwd_kernel(const T* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
                          T* __restrict__ y, float* __restrict__ norms, float* __restrict__ mean_out,
                          float* __restrict__ rstd_out, int64_t rows, int C, float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps leave together: the shuffles below see all 32 lanes
  float mean, rstd;
  const float squares =
      normalize_row<T, VEC, kCached>(x + row * C, y + row * C, weight, bias, C, eps, lane, mean, rstd);
  if (lane == 0) {
    norms[row] = sqrtf(squares);
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// The norm monitor's buffers and token groups (regkern.ops.layer_norm.NormAccumulators): token n of a sequence of
// `tokens` is group 0 (CLS) if n < num_cls, 1 (registers) if n < num_prefix, else 2 (patches).
struct NormMonitorArgs {
  int64_t tokens, num_cls, num_prefix;
  float threshold;     // +inf: no outliers counted
  const float* edges;  // ascending inner histogram edges; a norm's bin is the number of edges below it
  int num_edges;
  float* prefix_norms;  // (B, num_prefix), or nullptr: not written
  float* patch_norms;   // (B, tokens - num_prefix), or nullptr
  int64_t* candidates;  // (warps of the grid, kTopK): each warp's largest packed patch keys, -1 for none
  int64_t* count;
  double* total;
  double* total_sq;
  float* maximum;
  int64_t* outliers;
  int64_t* histogram;  // (3, num_edges + 1)
};

constexpr int kMaxBins = 64;
constexpr int kTopK = 16;  // candidates per warp: top_k <= 16

// The forward over rows (b, n) of (B, N, C), plus the norm monitor's reduction in the same pass: each block loops
// over rows (grid = a few blocks per SM), lane 0 of each warp keeps its rows' per-group count, sums, max and
// outliers in registers and the block's histogram in shared memory; at the end one atomic per (warp, statistic,
// group) and per (block, non-empty bin) adds them to the accumulators.
template <typename T, int VEC, int kCached>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    layer_norm_fwd_monitored_kernel(const T* __restrict__ x, const float* __restrict__ weight,
                                    const float* __restrict__ bias, T* __restrict__ y, float* __restrict__ mean_out,
                                    float* __restrict__ rstd_out, int64_t rows, int C, float eps, NormMonitorArgs m) {
  __shared__ int histogram[3 * kMaxBins];
  const int bins = m.num_edges + 1;
  for (int i = threadIdx.x; i < 3 * bins; i += blockDim.x) histogram[i] = 0;
  __syncthreads();
  const int lane = threadIdx.x % 32;
  int64_t count[3] = {0, 0, 0}, outliers[3] = {0, 0, 0};
  double total[3] = {0.0, 0.0, 0.0}, total_sq[3] = {0.0, 0.0, 0.0};
  float maximum[3] = {0.f, 0.f, 0.f};
  int64_t top[kTopK];  // lane 0: the warp's largest keys (norm bits << 32 | patch index); unrolled, in registers
#pragma unroll
  for (int i = 0; i < kTopK; ++i) top[i] = -1;
  const int64_t stride = int64_t(gridDim.x) * kRowsPerBlock;
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32; row < rows; row += stride) {
    float mean, rstd;
    const float norm =
        sqrtf(normalize_row<T, VEC, kCached>(x + row * C, y + row * C, weight, bias, C, eps, lane, mean, rstd));
    int below = 0;  // torch.bucketize(norm, edges): the lanes count the edges strictly below the norm
    for (int e = lane; e < m.num_edges; e += 32) below += m.edges[e] < norm ? 1 : 0;
    below = norm != norm ? m.num_edges : warp_sum_int(below);  // NaN: the last bin, as torch.bucketize
    if (lane == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
      const int64_t token = row % m.tokens, image = row / m.tokens;
      const int g = (token >= m.num_cls ? 1 : 0) + (token >= m.num_prefix ? 1 : 0);
      if (g == 2) {
        const int64_t patch = image * (m.tokens - m.num_prefix) + token - m.num_prefix;
        if (m.patch_norms != nullptr) m.patch_norms[patch] = norm;
        int32_t bits;
        memcpy(&bits, &norm, 4);  // non-negative float bits order as integers
        const int64_t key = (int64_t(bits) << 32) | patch;
        int smallest = 0;  // static indices only (after unrolling): the keys stay in registers
        int64_t smallest_key = top[0];
#pragma unroll
        for (int i = 1; i < kTopK; ++i) {
          if (top[i] < smallest_key) {
            smallest_key = top[i];
            smallest = i;
          }
        }
#pragma unroll
        for (int i = 0; i < kTopK; ++i) top[i] = (i == smallest && key > smallest_key) ? key : top[i];
      } else if (m.prefix_norms != nullptr) {
        m.prefix_norms[image * m.num_prefix + token] = norm;
      }
#pragma unroll
      for (int k = 0; k < 3; ++k) {  // unrolled selects: the per-group statistics stay in registers
        if (k != g) continue;
        count[k] += 1;
        total[k] += double(norm);
        total_sq[k] += double(norm) * double(norm);
        maximum[k] = (norm != norm || norm > maximum[k]) ? norm : maximum[k];  // a NaN norm shows, as in amax
        outliers[k] += norm > m.threshold ? 1 : 0;
      }
      atomic_add(&histogram[g * bins + below], 1);
    }
  }
  if (lane == 0) {
    const int64_t warp = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
#pragma unroll
    for (int i = 0; i < kTopK; ++i) m.candidates[warp * kTopK + i] = top[i];
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      if (count[g] == 0) continue;
      atomic_add(m.count + g, count[g]);
      atomic_add(m.total + g, total[g]);
      atomic_add(m.total_sq + g, total_sq[g]);
      atomic_max_nonnegative(m.maximum + g, maximum[g]);
      if (outliers[g] != 0) atomic_add(m.outliers + g, outliers[g]);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 3 * bins; i += blockDim.x) {
    if (histogram[i] != 0) atomic_add(m.histogram + i, int64_t(histogram[i]));
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

int64_t monitored_blocks(int64_t rows) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  // few blocks, each over many rows: the atomics per call stay ~ blocks x (warps x groups + non-empty bins)
  return std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(8) * REGKERN_MULTIPROCESSORS()));
}

template <typename T>
void launch_monitored(const at::Tensor& x, const float* w, const float* b, at::Tensor& y, at::Tensor& mean,
                      at::Tensor& rstd, int64_t rows, int C, float eps, const NormMonitorArgs& m,
                      regkern_stream_t stream) {
  const dim3 grid(static_cast<unsigned>(monitored_blocks(rows)));
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  T* yp = reinterpret_cast<T*>(y.data_ptr());
  const bool vec = C % 8 == 0 && reinterpret_cast<uintptr_t>(xp) % 16 == 0;
  auto kernel = !vec              ? layer_norm_fwd_monitored_kernel<T, 1, 0>
                : C <= 32 * 8 * 4 ? layer_norm_fwd_monitored_kernel<T, 8, 4>
                : C <= 32 * 8 * 8 ? layer_norm_fwd_monitored_kernel<T, 8, 8>
                                  : layer_norm_fwd_monitored_kernel<T, 8, 0>;
  REGKERN_LAUNCH(kernel, grid, kRowsPerBlock * 32, stream, xp, w, b, yp, mean.data_ptr<float>(), rstd.data_ptr<float>(),
                 rows, C, eps, m);
  REGKERN_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_monitored_cuda(
    const at::Tensor& x_in, const OptTensor& weight, const OptTensor& bias, double eps, int64_t num_cls,
    int64_t num_prefix, double threshold, const at::Tensor& inner_edges, int64_t top_k, bool write_norms,
    at::Tensor& count, at::Tensor& total, at::Tensor& total_sq, at::Tensor& maximum, at::Tensor& outliers,
    at::Tensor& histogram) {
  const int64_t C = check_layer_norm_args(x_in, weight, bias, eps);
  check_norm_monitor_args(x_in, num_cls, num_prefix, inner_edges, count, total, total_sq, maximum, outliers, histogram);
  TORCH_CHECK(inner_edges.numel() + 1 <= kMaxBins, "inner_edges: at most ", kMaxBins - 1, " edges, got ",
              inner_edges.numel());
  TORCH_CHECK(top_k >= 0 && top_k <= kTopK, "top_k: the CUDA kernel keeps at most ", kTopK, " candidates, got ", top_k);
  REGKERN_DEVICE_CHECK(x_in, "x");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "x: the CUDA LayerNorm kernel supports float16, bfloat16 and float32, got ", dtype);
  TORCH_CHECK(C < (int64_t(1) << 30), "x: last dim C = ", C, " is too large");
  REGKERN_DEVICE_GUARD(x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), rows = B * N;
  const at::Tensor w = weight.has_value() ? weight->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor edges = inner_edges.contiguous();
  auto y = new_output(x.sizes(), x.options());
  auto f32 = x.options().dtype(at::kFloat);
  auto prefix_norms = write_norms ? new_output({B, num_prefix}, f32) : new_output({0}, f32);
  auto patch_norms = write_norms ? new_output({B, N - num_prefix}, f32) : new_output({0}, f32);
  auto candidates = new_output({monitored_blocks(rows) * kRowsPerBlock * kTopK}, x.options().dtype(at::kLong));
  auto mean = new_output({B, N}, f32), rstd = new_output({B, N}, f32);
  if (rows == 0) candidates.fill_(-1);
  if (rows > 0) {
    const NormMonitorArgs m{N,
                            num_cls,
                            num_prefix,
                            static_cast<float>(threshold),
                            edges.data_ptr<float>(),
                            static_cast<int>(edges.numel()),
                            write_norms ? prefix_norms.data_ptr<float>() : nullptr,
                            write_norms ? patch_norms.data_ptr<float>() : nullptr,
                            candidates.data_ptr<int64_t>(),
                            count.data_ptr<int64_t>(),
                            total.data_ptr<double>(),
                            total_sq.data_ptr<double>(),
                            maximum.data_ptr<float>(),
                            outliers.data_ptr<int64_t>(),
                            histogram.data_ptr<int64_t>()};
    regkern_stream_t stream = REGKERN_STREAM;
    const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    const int c = static_cast<int>(C);
    const float e = static_cast<float>(eps);
    if (dtype == at::kHalf) {
      launch_monitored<__half>(x, wp, bp, y, mean, rstd, rows, c, e, m, stream);
    } else if (dtype == at::kBFloat16) {
      launch_monitored<__nv_bfloat16>(x, wp, bp, y, mean, rstd, rows, c, e, m, stream);
    } else {
      launch_monitored<float>(x, wp, bp, y, mean, rstd, rows, c, e, m, stream);
    }
  }
  return {y, prefix_norms, patch_norms, candidates, mean, rstd};
}

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
