// Entry embedding in one pass: [CLS, registers, patches] plus absolute position embeddings, as timm's
// VisionTransformer._pos_embed (the prefix gets position embeddings unless no_embed_class). Every output element is
// written once: the sum is taken in float32 and rounded once, as regkern.reference.embed_tokens does. Channels move
// 8 at a time (16-byte accesses) when C % 8 == 0 and the rows are aligned.
#include "regkern.h"

#include "cuda_launch.cuh"

#include <type_traits>

namespace regkern {
namespace {

struct EmbedParams {
  const void* x;    // (B, M, C) with strides
  const void* pos;  // (1, M or P + M, C) contiguous rows, or nullptr
  const void* cls;  // (C,) or nullptr
  const void* reg;  // (R, C) contiguous, or nullptr
  void* out;        // (B, P + M, C) contiguous
  int64_t x_strides[3];
  int64_t B, M, C, P;
  bool has_cls, no_embed_class;
};

// VEC consecutive channels per step: 8 (16-byte accesses) when C % 8 == 0 and every row is 16-byte aligned, else 1
template <typename T, int VEC>
__global__ void embed_tokens_kernel(const EmbedParams p) {
  const int64_t L = p.P + p.M;
  const int64_t chunks = p.C / VEC;
  const int64_t total = p.B * L * chunks;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (i % chunks) * VEC;
    const int64_t n = (i / chunks) % L;
    const int64_t b = i / (chunks * L);
    float val[VEC];
    int64_t pos_row = n;
    if (n < p.P) {
      const bool is_cls = p.has_cls && n == 0;
      const int64_t r = n - (p.has_cls ? 1 : 0);
      load_vec<T, VEC>(is_cls ? static_cast<const T*>(p.cls) + c : static_cast<const T*>(p.reg) + r * p.C + c, val);
      if (p.no_embed_class) pos_row = -1;  // the prefix gets no position embedding
    } else {
      const int64_t m = n - p.P;
      const T* src = static_cast<const T*>(p.x) + b * p.x_strides[0] + m * p.x_strides[1];
      if constexpr (VEC == 1) {
        load_vec<T, 1>(src + c * p.x_strides[2], val);
      } else {
        load_vec<T, VEC>(src + c, val);  // unit channel stride (checked by the launcher)
      }
      if (p.no_embed_class) pos_row = m;
    }
    if (p.pos != nullptr && pos_row >= 0) {
      float pos[VEC];
      load_vec<T, VEC>(static_cast<const T*>(p.pos) + pos_row * p.C + c, pos);
#pragma unroll
      for (int e = 0; e < VEC; ++e) val[e] += pos[e];
    }
    store_vec<T, VEC>(static_cast<T*>(p.out) + (b * L + n) * p.C + c, val);
  }
}

}  // namespace

at::Tensor embed_tokens_cuda(const at::Tensor& x_in, const OptTensor& pos_embed, const OptTensor& cls_token,
                             const OptTensor& reg_token, bool no_embed_class) {
  const EmbedShape s = check_embed_args(x_in, pos_embed, cls_token, reg_token, no_embed_class);
  REGKERN_DEVICE_CHECK(x_in, "x");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "x: the CUDA embed_tokens kernel supports float16, bfloat16 and float32, got ", dtype);
  REGKERN_DEVICE_GUARD(x_in);
  const at::Tensor x = patches_as_sequence(x_in);
  const at::Tensor pos = pos_embed.has_value() ? pos_embed->contiguous() : at::Tensor();
  const at::Tensor cls = cls_token.has_value() ? cls_token->contiguous() : at::Tensor();
  const at::Tensor reg = reg_token.has_value() ? reg_token->contiguous() : at::Tensor();
  auto out = new_output({s.B, s.P + s.M, s.C}, x.options());

  EmbedParams p{};
  p.x = x.data_ptr();
  p.pos = pos.defined() ? pos.data_ptr() : nullptr;
  p.cls = cls.defined() ? cls.data_ptr() : nullptr;
  p.reg = reg.defined() ? reg.data_ptr() : nullptr;
  p.out = out.data_ptr();
  for (int i = 0; i < 3; ++i) p.x_strides[i] = x.stride(i);
  p.B = s.B;
  p.M = s.M;
  p.C = s.C;
  p.P = s.P;
  p.has_cls = s.has_cls;
  p.no_embed_class = no_embed_class;

  const int64_t total = out.numel();
  if (total == 0) return out;
  auto aligned = [](const at::Tensor& t) {
    return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  const bool vec = s.C % 8 == 0 && x.stride(2) == 1 && x.stride(0) % 8 == 0 && x.stride(1) % 8 == 0 && aligned(x) &&
                   aligned(pos) && aligned(cls) && aligned(reg);
  constexpr int kThreads = 256;
  const int64_t steps = vec ? total / 8 : total;
  const int64_t blocks = std::min<int64_t>((steps + kThreads - 1) / kThreads, int64_t(1) << 20);
  regkern_stream_t stream = REGKERN_STREAM;
  auto pick = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return vec ? embed_tokens_kernel<T, 8> : embed_tokens_kernel<T, 1>;
  };
  auto kernel = dtype == at::kHalf       ? pick(static_cast<__half*>(nullptr))
                : dtype == at::kBFloat16 ? pick(static_cast<__nv_bfloat16*>(nullptr))
                                         : pick(static_cast<float*>(nullptr));
  REGKERN_LAUNCH(kernel, dim3(unsigned(blocks)), kThreads, stream, p);
  REGKERN_LAUNCH_CHECK();
  return out;
}

}  // namespace regkern
