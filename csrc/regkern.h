// Shared declarations of regkern's C++/CUDA extension (regkern._C).
//
// Ops (schemas in ops.cpp, namespace "regkern"; CPU implementations in ops.cpp, CUDA ones in the .cu files):
//   cuda_attention_fwd(q, k, v, reg_k?, reg_v?, scale, num_prefix, want_out_norm) -> (out, lse, out_norm)
//   cuda_layer_norm_fwd(x, weight?, bias?, eps) -> (y, norms, mean, rstd)
//   cuda_embed_tokens(x, pos_embed?, cls_token?, reg_token?, no_embed_class) -> tokens
// Semantics are those of regkern/reference.py (float32 accumulation); shapes are documented in ops.cpp.
#pragma once

#include <ATen/ATen.h>
#include <optional>

#include <tuple>

namespace regkern {

using OptTensor = std::optional<at::Tensor>;

// ---- input checks shared by the CPU and CUDA implementations (TORCH_CHECK messages name the argument) ----

struct AttentionShape {
  int64_t B, N, H, d, R;
};

AttentionShape check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const OptTensor& reg_k, const OptTensor& reg_v, double scale, int64_t num_prefix);

int64_t check_layer_norm_args(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps);

struct EmbedShape {
  int64_t B, M, C, P, R;
  bool has_cls;
};

EmbedShape check_embed_args(const at::Tensor& x, const OptTensor& pos_embed, const OptTensor& cls_token,
                            const OptTensor& reg_token, bool no_embed_class);

// (B, M, C) view of patch tokens given as (B, M, C) or (B, Hp, Wp, C)
at::Tensor patches_as_sequence(const at::Tensor& x);

// Fresh output buffers; filled with NaN when $REGKERN_DEBUG_NAN_FILL=1 so tests see elements a kernel left unwritten.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// ---- CUDA implementations (attention.cu, layer_norm.cu, embed_tokens.cu) ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const OptTensor& reg_k,
                                                                  const OptTensor& reg_v, double scale,
                                                                  int64_t num_prefix, bool want_out_norm);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x,
                                                                               const OptTensor& weight,
                                                                               const OptTensor& bias, double eps);

at::Tensor embed_tokens_cuda(const at::Tensor& x, const OptTensor& pos_embed, const OptTensor& cls_token,
                             const OptTensor& reg_token, bool no_embed_class);

}  // namespace regkern
