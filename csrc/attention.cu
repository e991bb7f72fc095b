// Fused register attention forward on tensor cores (mma.sync m16n8k16, sm_80 and newer), FlashAttention-2 style.
//
// Keys are walked as two segments so the register tokens are never concatenated:
//   small segment: R KV-only registers (own buffer, shared (R, H, d) or per batch (B, R, H, d)) followed by the
//                  P prefix tokens (CLS + registers) of the sequence;
//   patch segment: tokens P .. N-1, tiled from P so every full tile is aligned to the patches.
// Each block owns 64 queries of one (batch, head); each of its 4 warps owns 16 query rows and keeps its Q fragments,
// running max / sum and output accumulator in registers. K and V tiles of 64 keys stream through two shared-memory
// stages with cp.async (the next tile's copies overlap this tile's math; rows past a segment's end are zero-filled
// by the copy itself); ldmatrix feeds the mma operands, transposing V on the way.
#include "regkern.h"

#include "cuda_launch.cuh"

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace regkern {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = kWarps * 16;  // queries per block
constexpr int kBlockN = 64;           // keys per tile
constexpr int kPad = 8;               // row padding (elements) so fragment loads hit 32 distinct banks
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Two floats rounded to T and packed into one 32-bit fragment register (the first in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T a = from_float<T>(lo), b = from_float<T>(hi);
  uint16_t bits_a, bits_b;
  memcpy(&bits_a, &a, 2);  // register moves; no type-punned access
  memcpy(&bits_b, &b, 2);
  return uint32_t(bits_a) | (uint32_t(bits_b) << 16);
}

#define REGKERN_MMA_M16N8K16(TYPES)                             \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPES   \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "   \
               "{%0,%1,%2,%3};\n"                               \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

// c += A (16x16, row-major fragments a) * B (16x8, column-major fragments b0, b1), float32 accumulate
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef REGKERN_EMULATE
  regkern_emu::mma_m16n8k16<T>(c, a, b0, b1);
#else
  if constexpr (std::is_same_v<T, __half>) {
    REGKERN_MMA_M16N8K16("f16.f16");
  } else {
    REGKERN_MMA_M16N8K16("bf16.bf16");
  }
#endif
}

struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  const void* reg_k;
  const void* reg_v;
  void* out;                                         // (B, N, H, d) contiguous
  float* lse;                                        // (B, H, N)
  float* out_sq;                                     // (B, H, N) per-head squared output norms, or nullptr
  int64_t q_strides[3], k_strides[3], v_strides[3];  // batch, token, head (elements; the last dim is unit stride)
  int64_t rk_strides[3], rv_strides[3];              // batch (0 when shared), register, head
  int N, H, R, P;
  float scale_log2;  // scale * log2(e): scores live in the exp2 domain
};

// Row `row` of key tile `tile` as (K row pointer, V row pointer); nullptr past the end of its segment.
template <typename T>
__device__ __forceinline__ void key_row(const AttentionParams& p, int b, int h, int tile, int small_tiles, int row,
                                        const T*& krow, const T*& vrow) {
  krow = nullptr;
  vrow = nullptr;
  if (tile < small_tiles) {
    const int s = tile * kBlockN + row;  // index in [registers, prefix]
    if (s < p.R) {
      krow = static_cast<const T*>(p.reg_k) + b * p.rk_strides[0] + s * p.rk_strides[1] + h * p.rk_strides[2];
      vrow = static_cast<const T*>(p.reg_v) + b * p.rv_strides[0] + s * p.rv_strides[1] + h * p.rv_strides[2];
    } else if (s < p.R + p.P) {
      const int64_t n = s - p.R;
      krow = static_cast<const T*>(p.k) + b * p.k_strides[0] + n * p.k_strides[1] + h * p.k_strides[2];
      vrow = static_cast<const T*>(p.v) + b * p.v_strides[0] + n * p.v_strides[1] + h * p.v_strides[2];
    }
  } else {
    const int64_t n = p.P + int64_t(tile - small_tiles) * kBlockN + row;
    if (n < p.N) {
      krow = static_cast<const T*>(p.k) + b * p.k_strides[0] + n * p.k_strides[1] + h * p.k_strides[2];
      vrow = static_cast<const T*>(p.v) + b * p.v_strides[0] + n * p.v_strides[1] + h * p.v_strides[2];
    }
  }
}

// Shared-memory plan of one block: two stages of (K tile, V tile), each 64 rows of D elements padded to D + 8 so
// that the 8 rows an ldmatrix phase reads start in 8 distinct groups of 4 banks. The Q tile is staged in stage 1
// before the first key tile needs it (its fragments then live in registers).
template <int D>
struct SmemPlan {
  static constexpr int kRow = D + kPad;             // elements per padded row
  static constexpr int kTile = kBlockN * kRow;      // elements per K or V tile
  static constexpr int kStage = 2 * kTile;          // K then V
  static constexpr size_t kBytes = 2 * kStage * 2;  // two stages of 16-bit elements
};

template <typename T, int D>
__device__ __forceinline__ void issue_key_tile(const AttentionParams& p, int b, int h, int tile, int small_tiles,
                                               T* k_tile, T* v_tile, int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kRow = SmemPlan<D>::kRow;
  for (int idx = tid; idx < kBlockN * kChunks; idx += kThreads) {
    const int row = idx / kChunks, chunk = idx % kChunks;
    const T *krow, *vrow;
    key_row<T>(p, b, h, tile, small_tiles, row, krow, vrow);
    const bool valid = krow != nullptr;  // rows past the segment's end are zero-filled: 0 * p stays 0 in P V
    cp_async_16(&k_tile[row * kRow + chunk * 8], valid ? krow + chunk * 8 : static_cast<const T*>(p.k), valid ? 16 : 0);
    cp_async_16(&v_tile[row * kRow + chunk * 8], valid ? vrow + chunk * 8 : static_cast<const T*>(p.v), valid ? 16 : 0);
  }
  cp_async_commit();
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) register_attention_fwd_kernel(const AttentionParams p) {
  using Plan = SmemPlan<D>;
  constexpr int kRow = Plan::kRow;
  constexpr int kDTiles = D / 8;        // n8 tiles of the output
  constexpr int kKSteps = D / 16;       // k16 steps of Q K^T
  constexpr int kNTiles = kBlockN / 8;  // n8 tiles of the scores
  REGKERN_DYNAMIC_SMEM(smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);
  auto k_stage = [&](int stage) { return smem + stage * Plan::kStage; };
  auto v_stage = [&](int stage) { return smem + stage * Plan::kStage + Plan::kTile; };

  const int m_tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates: row group, thread in group
  const int m0 = m_tile * kBlockM;

  const int small_keys = p.R + p.P;
  const int small_tiles = (small_keys + kBlockN - 1) / kBlockN;
  const int patch_tiles = (p.N - p.P + kBlockN - 1) / kBlockN;
  const int tiles = small_tiles + patch_tiles;

  // ---- prologue: Q tile into stage 1 and key tile 0 into stage 0, both in flight together ----
  {
    T* q_tile = k_stage(1);
    constexpr int kChunks = D / 8;
    for (int idx = tid; idx < kBlockM * kChunks; idx += kThreads) {
      const int row = idx / kChunks, chunk = idx % kChunks;
      const int64_t n = m0 + row;
      const T* src = static_cast<const T*>(p.q);
      const bool valid = n < p.N;
      if (valid) src += b * p.q_strides[0] + n * p.q_strides[1] + h * p.q_strides[2] + chunk * 8;
      cp_async_16(&q_tile[row * kRow + chunk * 8], src, valid ? 16 : 0);
    }
    cp_async_commit();
  }
  issue_key_tile<T, D>(p, b, h, 0, small_tiles, k_stage(0), v_stage(0), tid);
  cp_async_wait<1>();  // the Q group has landed (tile 0 may still be in flight)
  __syncthreads();
  // A fragments of this warp's 16 rows for every k16 step: matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15)
  uint32_t q_frag[kKSteps][4];
  {
    const T* q_tile = k_stage(1);
    const int row = warp * 16 + (lane / 8 % 2) * 8 + lane % 8, col = (lane / 16) * 8;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) ldmatrix_x4(q_frag[ks], &q_tile[row * kRow + ks * 16 + col]);
  }
  cp_async_wait<0>();
  __syncthreads();  // tile 0 visible to all; every warp holds its Q fragments, so stage 1 is free

  float acc[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8 of this warp, exp2 domain
  float row_sum[2] = {0.f, 0.f};              // this thread's share; reduced over the quad at the end

  for (int tile = 0; tile < tiles; ++tile) {
    const int stage = tile & 1;
    // the next tile's copies run while this one is computed
    if (tile + 1 < tiles)
      issue_key_tile<T, D>(p, b, h, tile + 1, small_tiles, k_stage(stage ^ 1), v_stage(stage ^ 1), tid);
    const int tile_keys = tile < small_tiles ? min(kBlockN, small_keys - tile * kBlockN)
                                             : min(kBlockN, p.N - p.P - (tile - small_tiles) * kBlockN);
    const T* k_tile = k_stage(stage);
    const T* v_tile = v_stage(stage);

    // ---- S = Q K^T for this warp's 16 rows x 64 keys; B fragments of two k16 steps per ldmatrix ----
    float s[kNTiles][4];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      const T* krow = &k_tile[(nt * 8 + lane % 8) * kRow + (lane / 8) * 8];  // matrix lane / 8: d offset 8 * it
#pragma unroll
      for (int ks = 0; ks < kKSteps; ks += 2) {
        uint32_t kb[4];  // b0, b1 of step ks, then of step ks + 1
        ldmatrix_x4(kb, krow + ks * 16);
        mma_m16n8k16<T>(s[nt], q_frag[ks], kb[0], kb[1]);
        mma_m16n8k16<T>(s[nt], q_frag[ks + 1], kb[2], kb[3]);
      }
    }

    // ---- online softmax (exp2 domain); masked keys get -inf ----
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = nt * 8 + 2 * t + (e & 1);
        const float val = key < tile_keys ? s[nt][e] * p.scale_log2 : -INFINITY;
        s[nt][e] = val;
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], val);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float new_max = fmaxf(row_max[r], tile_max[r]);  // finite: every tile has at least one key
      alpha[r] = exp2f(row_max[r] - new_max);                // 0 on the first tile (-inf - finite)
      row_max[r] = new_max;
      row_sum[r] *= alpha[r];
    }
#pragma unroll
    for (int i = 0; i < kDTiles; ++i) {
      acc[i][0] *= alpha[0];
      acc[i][1] *= alpha[0];
      acc[i][2] *= alpha[1];
      acc[i][3] *= alpha[1];
    }
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - row_max[e >> 1]);
        row_sum[e >> 1] += s[nt][e];
      }
    }

    // ---- O += P V: the score accumulators of two n8 tiles form one A fragment of P; V^T fragments come from the
    // row-major V tile through the transposing ldmatrix, two d tiles per load ----
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t p_frag[4];
      p_frag[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      p_frag[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      p_frag[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      p_frag[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      // matrix lane / 8: keys kk * 16 + 8 * (it % 2), d columns 8 * (it / 2) beyond dt * 8
      const T* vrow = &v_tile[(kk * 16 + (lane / 8 % 2) * 8 + lane % 8) * kRow + (lane / 16) * 8];
#pragma unroll
      for (int dt = 0; dt < kDTiles; dt += 2) {
        uint32_t vb[4];  // b0, b1 of d tile dt, then of dt + 1
        ldmatrix_x4_trans(vb, vrow + dt * 8);
        mma_m16n8k16<T>(acc[dt], p_frag, vb[0], vb[1]);
        mma_m16n8k16<T>(acc[dt + 1], p_frag, vb[2], vb[3]);
      }
    }
    cp_async_wait<0>();  // the next tile has landed ...
    __syncthreads();     // ... for every thread, and nobody reads this stage any more (it is refilled next)
  }

  // ---- epilogue: normalise, store out (B, N, H, d), lse and the per-head squared output norm ----
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
  const float inv[2] = {1.f / row_sum[0], 1.f / row_sum[1]};
  float sq[2] = {0.f, 0.f};
  const int64_t HD = int64_t(p.H) * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t n = m0 + warp * 16 + g + 8 * r;
    T* orow = static_cast<T*>(p.out) + (int64_t(b) * p.N + n) * HD + int64_t(h) * D;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      const float o0 = acc[dt][2 * r] * inv[r], o1 = acc[dt][2 * r + 1] * inv[r];
      sq[r] += o0 * o0 + o1 * o1;
      if (n < p.N) *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * t) = pack2<T>(o0, o1);
    }
    sq[r] += __shfl_xor_sync(0xffffffffu, sq[r], 1);
    sq[r] += __shfl_xor_sync(0xffffffffu, sq[r], 2);
    if (t == 0 && n < p.N) {
      const int64_t at = (int64_t(b) * p.H + h) * p.N + n;
      p.lse[at] = (row_max[r] + log2f(row_sum[r])) * kLn2;
      if (p.out_sq != nullptr) p.out_sq[at] = sq[r];
    }
  }
}

bool aligned_rows(const at::Tensor& t) {
  // 16-byte vector loads: aligned base and token/head/batch strides that are multiples of 8 elements
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int i = 0; i < t.dim() - 1; ++i) {
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) return false;
  }
  return t.stride(-1) == 1;
}

// A fresh allocation is aligned; .contiguous() alone would return an already-contiguous view at an odd offset as is.
at::Tensor loadable(const at::Tensor& t) { return aligned_rows(t) ? t : t.clone(at::MemoryFormat::Contiguous); }

template <typename T, int D>
void launch(const AttentionParams& p, int B, regkern_stream_t stream) {
  const dim3 grid((p.N + kBlockM - 1) / kBlockM, p.H, B);
  auto kernel = register_attention_fwd_kernel<T, D>;
  constexpr size_t kSmem = SmemPlan<D>::kBytes;  // 36 KiB at d = 64, 68 KiB at d = 128
  if (kSmem > 48 * 1024) REGKERN_ALLOW_DYNAMIC_SMEM(kernel, kSmem);
  REGKERN_LAUNCH_SMEM(kernel, grid, kThreads, kSmem, stream, p);
  REGKERN_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                  const at::Tensor& v_in, const OptTensor& reg_k,
                                                                  const OptTensor& reg_v, double scale,
                                                                  int64_t num_prefix, bool want_out_norm) {
  const AttentionShape s = check_attention_args(q_in, k_in, v_in, reg_k, reg_v, scale, num_prefix);
  REGKERN_DEVICE_CHECK(q_in, "q");
  TORCH_CHECK(q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16,
              "q: the CUDA attention kernel supports float16 and bfloat16, got ", q_in.scalar_type());
  TORCH_CHECK(s.d == 64 || s.d == 128, "q: the CUDA attention kernel supports head_dim 64 and 128, got ", s.d);
  TORCH_CHECK(s.N < (int64_t(1) << 31) / 2, "q: sequence length ", s.N, " is too large");
  REGKERN_DEVICE_GUARD(q_in);

  const at::Tensor q = loadable(q_in), k = loadable(k_in), v = loadable(v_in);
  at::Tensor rk, rv;
  if (s.R > 0) {
    rk = loadable(*reg_k);
    rv = loadable(*reg_v);
  }
  auto out = new_output({s.B, s.N, s.H, s.d}, q.options());
  auto f32 = q.options().dtype(at::kFloat);
  auto lse = new_output({s.B, s.H, s.N}, f32);
  auto out_sq = want_out_norm ? new_output({s.B, s.H, s.N}, f32) : at::Tensor();

  AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.out_sq = want_out_norm ? out_sq.data_ptr<float>() : nullptr;
  for (int i = 0; i < 3; ++i) {
    p.q_strides[i] = q.stride(i);
    p.k_strides[i] = k.stride(i);
    p.v_strides[i] = v.stride(i);
  }
  if (s.R > 0) {
    const bool shared = rk.dim() == 3;
    const int o = shared ? 0 : 1;  // first non-batch dim
    p.reg_k = rk.data_ptr();
    p.reg_v = rv.data_ptr();
    p.rk_strides[0] = shared ? 0 : rk.stride(0);
    p.rv_strides[0] = shared ? 0 : rv.stride(0);
    p.rk_strides[1] = rk.stride(o);
    p.rk_strides[2] = rk.stride(o + 1);
    p.rv_strides[1] = rv.stride(o);
    p.rv_strides[2] = rv.stride(o + 1);
  } else {
    p.reg_k = p.reg_v = nullptr;
  }
  p.N = static_cast<int>(s.N);
  p.H = static_cast<int>(s.H);
  p.R = static_cast<int>(s.R);
  p.P = static_cast<int>(num_prefix);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;

  TORCH_CHECK(s.H <= 65535 && s.B <= 65535, "q: batch and head counts must be <= 65535, got B=", s.B, ", H=", s.H);
  regkern_stream_t stream = REGKERN_STREAM;
  const int B = static_cast<int>(s.B);
  if (q.scalar_type() == at::kHalf) {
    s.d == 64 ? launch<__half, 64>(p, B, stream) : launch<__half, 128>(p, B, stream);
  } else {
    s.d == 64 ? launch<__nv_bfloat16, 64>(p, B, stream) : launch<__nv_bfloat16, 128>(p, B, stream);
  }
  at::Tensor out_norm = want_out_norm ? out_sq.sum(1).sqrt() : at::empty({0}, f32);
  return {out, lse, out_norm};
}

}  // namespace regkern
