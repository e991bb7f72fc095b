// Fused register attention forward on tensor cores (mma.sync m16n8k16, sm_80 and newer), FlashAttention-2 style.
//
// Keys are walked as two segments so the register tokens are never concatenated:
//   small segment: R KV-only registers (own buffer, shared (R, H, d) or per batch (B, R, H, d)) followed by the
//                  P prefix tokens (CLS + registers) of the sequence;
//   patch segment: tokens P .. N-1, tiled from P so every full tile is aligned to the patches.
// Each block owns 64 queries of one (batch, head); each of its 4 warps owns 16 query rows and keeps its Q fragments,
// running max / sum and output accumulator in registers. K and V tiles (64 keys) go through shared memory; V is
// stored transposed there so the P @ V operand fragments are plain 32-bit loads.
#include "regkern.h"

#include "cuda_launch.cuh"

#include <cstdint>
#include <cstring>

namespace regkern {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = kWarps * 16;  // queries per block
constexpr int kBlockN = 64;           // keys per tile
constexpr int kPad = 8;               // row padding (elements) so fragment loads hit 32 distinct banks
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
struct MmaOps;

template <>
struct MmaOps<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t bits;
    memcpy(&bits, &h, 4);  // a register move; no type-punned access
    return bits;
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef REGKERN_EMULATE
    regkern_emu::mma_m16n8k16<__half>(c, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  static __device__ __forceinline__ void store2(__half* dst, float lo, float hi) {
    *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(lo, hi);
  }
};

template <>
struct MmaOps<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t bits;
    memcpy(&bits, &h, 4);
    return bits;
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef REGKERN_EMULATE
    regkern_emu::mma_m16n8k16<__nv_bfloat16>(c, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  static __device__ __forceinline__ void store2(__nv_bfloat16* dst, float lo, float hi) {
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(lo, hi);
  }
};

struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  const void* reg_k;
  const void* reg_v;
  void* out;        // (B, N, H, d) contiguous
  float* lse;       // (B, H, N)
  float* out_sq;    // (B, H, N) per-head squared output norms, or nullptr
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

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) register_attention_fwd_kernel(const AttentionParams p) {
  using Ops = MmaOps<T>;
  // Shared memory holds 32-bit words (two 16-bit elements each), the unit of the mma fragments. Padded rows of
  // (D + 8) and (64 + 8) elements put the 8 rows a fragment load touches in 8 distinct groups of 4 banks.
  constexpr int kRowWords = (D + kPad) / 2;       // K / Q row: element e of the row is half of word e / 2
  constexpr int kVtRowWords = (kBlockN + kPad) / 2;  // V^T row (one d): word j holds keys 2j and 2j + 1
  constexpr int kChunks = D / 8;                  // 16-byte chunks per row
  constexpr int kDTiles = D / 8;           // n8 tiles of the output
  constexpr int kKSteps = D / 16;          // k16 steps of Q K^T
  constexpr int kNTiles = kBlockN / 8;     // n8 tiles of the scores

  // Q shares the K buffer: its fragments move to registers before the first key tile
  __shared__ __align__(16) uint32_t k_smem[kBlockN * kRowWords];
  __shared__ __align__(16) uint32_t vt_smem[D * kVtRowWords];

  const int m_tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates: row group, thread in group
  const int m0 = m_tile * kBlockM;

  // ---- Q tile -> shared -> registers (A fragments, one set per k16 step) ----
  for (int idx = tid; idx < kBlockM * kChunks; idx += kThreads) {
    const int row = idx / kChunks, chunk = idx % kChunks;
    const int64_t n = m0 + row;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (n < p.N) {
      const T* src = static_cast<const T*>(p.q) + b * p.q_strides[0] + n * p.q_strides[1] + h * p.q_strides[2];
      val = *reinterpret_cast<const uint4*>(src + chunk * 8);
    }
    *reinterpret_cast<uint4*>(&k_smem[row * kRowWords + chunk * 4]) = val;
  }
  __syncthreads();
  uint32_t q_frag[kKSteps][4];
  {
    // A fragment of rows (g, g + 8) and columns (ks * 16 + 2t, + 8): words ks * 8 + t and ks * 8 + t + 4
    const uint32_t* qs = &k_smem[(warp * 16) * kRowWords];
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      q_frag[ks][0] = qs[g * kRowWords + ks * 8 + t];
      q_frag[ks][1] = qs[(g + 8) * kRowWords + ks * 8 + t];
      q_frag[ks][2] = qs[g * kRowWords + ks * 8 + t + 4];
      q_frag[ks][3] = qs[(g + 8) * kRowWords + ks * 8 + t + 4];
    }
  }

  float acc[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8 of this warp, exp2 domain
  float row_sum[2] = {0.f, 0.f};              // this thread's share; reduced over the quad at the end

  const int small_keys = p.R + p.P;
  const int small_tiles = (small_keys + kBlockN - 1) / kBlockN;
  const int patch_tiles = (p.N - p.P + kBlockN - 1) / kBlockN;
  const int tiles = small_tiles + patch_tiles;

  for (int tile = 0; tile < tiles; ++tile) {
    const int tile_keys = tile < small_tiles ? min(kBlockN, small_keys - tile * kBlockN)
                                             : min(kBlockN, p.N - p.P - (tile - small_tiles) * kBlockN);
    __syncthreads();  // previous tile (or the Q staging) fully consumed
    // each step loads one 16-byte chunk of two consecutive keys: K rows go to shared memory as they are, V rows
    // are interleaved into V^T words (key 2j in the low half, key 2j + 1 in the high half)
    for (int idx = tid; idx < (kBlockN / 2) * kChunks; idx += kThreads) {
      const int pair = idx / kChunks, chunk = idx % kChunks;
      uint32_t v_words[2][4];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = 2 * pair + r;
        const T *krow, *vrow;
        key_row<T>(p, b, h, tile, small_tiles, row, krow, vrow);
        uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);  // zeros past the end: 0 * p stays 0
        if (krow != nullptr) {
          kv = *reinterpret_cast<const uint4*>(krow + chunk * 8);
          vv = *reinterpret_cast<const uint4*>(vrow + chunk * 8);
        }
        *reinterpret_cast<uint4*>(&k_smem[row * kRowWords + chunk * 4]) = kv;
        v_words[r][0] = vv.x;
        v_words[r][1] = vv.y;
        v_words[r][2] = vv.z;
        v_words[r][3] = vv.w;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {  // element i of the chunk: half (i % 2) of word i / 2
        const int shift = 16 * (i % 2);
        const uint32_t lo = (v_words[0][i / 2] >> shift) & 0xffffu, hi = (v_words[1][i / 2] >> shift) & 0xffffu;
        vt_smem[(chunk * 8 + i) * kVtRowWords + pair] = lo | (hi << 16);
      }
    }
    __syncthreads();

    // ---- S = Q K^T for this warp's 16 rows x 64 keys ----
    float s[kNTiles][4];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      // B fragment (k = d, n = key): key nt * 8 + g, d pairs (ks * 16 + 2t, + 8) -> words ks * 8 + t, + 4
      const uint32_t* krow = &k_smem[(nt * 8 + g) * kRowWords];
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) Ops::mma(s[nt], q_frag[ks], krow[ks * 8 + t], krow[ks * 8 + t + 4]);
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

    // ---- O += P V: the score accumulators of two n8 tiles form one A fragment of P ----
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t p_frag[4];
      p_frag[0] = Ops::pack(s[2 * kk][0], s[2 * kk][1]);
      p_frag[1] = Ops::pack(s[2 * kk][2], s[2 * kk][3]);
      p_frag[2] = Ops::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      p_frag[3] = Ops::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        // B fragment (k = key, n = d): d = dt * 8 + g, keys (kk * 16 + 2t, + 8) -> V^T words kk * 8 + t, + 4
        const uint32_t* vrow = &vt_smem[(dt * 8 + g) * kVtRowWords + kk * 8];
        Ops::mma(acc[dt], p_frag, vrow[t], vrow[t + 4]);
      }
    }
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
      if (n < p.N) Ops::store2(orow + dt * 8 + 2 * t, o0, o1);
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
  REGKERN_LAUNCH(kernel, grid, kThreads, stream, p);
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
