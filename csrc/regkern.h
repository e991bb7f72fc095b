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

// the monitored LayerNorm's extra arguments: x (B, N, C); 0 <= num_cls <= num_prefix <= N; inner_edges float32;
// accumulators on x's device, contiguous: count, outliers (3,) int64, total, total_sq (3,) float64, maximum (3,)
// float32, histogram (3, edges + 1) int64
void check_norm_monitor_args(const at::Tensor& x, int64_t num_cls, int64_t num_prefix, const at::Tensor& inner_edges,
                             const at::Tensor& count, const at::Tensor& total, const at::Tensor& total_sq,
                             const at::Tensor& maximum, const at::Tensor& outliers, const at::Tensor& histogram);

struct EmbedShape {
  int64_t B, M, C, P, R;
  bool has_cls;
};

EmbedShape check_embed_args(const at::Tensor& x, const OptTensor& pos_embed, const OptTensor& cls_token,
                            const OptTensor& reg_token, bool no_embed_class);

// (B, M, C) view of patch tokens given as (B, M, C) or (B, Hp, Wp, C)
at::Tensor patches_as_sequence(const at::Tensor& x);

// Fresh output buffers; filled with NaN (integers: -2) when $REGKERN_DEBUG_NAN_FILL=1 so tests see elements a kernel
// left unwritten.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// ---- CUDA implementations (attention.cu, layer_norm.cu, embed_tokens.cu) ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, const OptTensor& reg_k,
                                                                  const OptTensor& reg_v, double scale,
                                                                  int64_t num_prefix, bool want_out_norm);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x,
                                                                               const OptTensor& weight,
                                                                               const OptTensor& bias, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_monitored_cuda(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps, int64_t num_cls,
    int64_t num_prefix, double threshold, const at::Tensor& inner_edges, int64_t top_k, bool write_norms,
    at::Tensor& count, at::Tensor& total, at::Tensor& total_sq, at::Tensor& maximum, at::Tensor& outliers,
    at::Tensor& histogram);

at::Tensor embed_tokens_cuda(const at::Tensor& x, const OptTensor& pos_embed, const OptTensor& cls_token,
                             const OptTensor& reg_token, bool no_embed_class);

}  // namespace regkern
