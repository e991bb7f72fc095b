// regkern._C: op schemas (TORCH_LIBRARY "regkern"), input checks, and the CPU implementations.
//
// The CPU implementations are C++ references with the semantics of regkern/reference.py (ATen, float32
// accumulation). They let CI, which has no GPU, exercise the schemas, the checks and the Python registrations
// (fake tensors, autograd, torch.compile) of the same ops whose CUDA implementations live in the .cu files.
//
//   cuda_attention_fwd(q, k, v, reg_k?, reg_v?, scale, num_prefix, want_out_norm) -> (out, lse, out_norm)
//     q, k, v: (B, N, H, d), any strides; reg_k, reg_v: KV-only registers (R, H, d) or (B, R, H, d).
//     out: (B, N, H, d) contiguous in q's dtype (= (B, N, C)); lse: (B, H, N) float32 (natural log);
//     out_norm: (B, N) float32, L2 norm of each token's float32 output over all heads, or (0,) when not wanted.
//   cuda_layer_norm_fwd(x, weight?, bias?, eps) -> (y, norms, mean, rstd)
//     x: (..., C); y: x's shape and dtype, contiguous; norms/mean/rstd: x.shape[:-1] float32.
//   cuda_layer_norm_fwd_monitored(x, weight?, bias?, eps, num_cls, num_prefix, threshold, inner_edges, top_k,
//                                 write_norms, count!, total!, total_sq!, maximum!, outliers!, histogram!)
//       -> (y, prefix_norms, patch_norms, candidates, mean, rstd)
//     x: (B, N, C); the LayerNorm forward plus the norm monitor's per-group reduction (reference.norm_statistics)
//     added in place to the accumulators; prefix_norms (B, P), patch_norms (B, N - P) float32 ((0,) unless
//     write_norms); candidates int64 packed keys (reference.patch_norm_keys, -1 = none) holding the top_k largest
//     patch norms; mean/rstd (B, N) float32.
//   cuda_embed_tokens(x, pos_embed?, cls_token?, reg_token?, no_embed_class) -> (B, P + M, C)
//     x: (B, M, C) or (B, Hp, Wp, C); pos_embed: (1, M, C) when no_embed_class else (1, P + M, C);
//     cls_token: (1, 1, C); reg_token: (1, R, C); all of x's dtype.
#include <Python.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <string>
#include <utility>

#include "regkern.h"

namespace regkern {

namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

}  // namespace

AttentionShape check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const OptTensor& reg_k, const OptTensor& reg_v, double scale, int64_t num_prefix) {
  TORCH_CHECK(q.dim() == 4, "q: expected 4 dims (B, N, H, d), got shape ", shape_of(q));
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat,
              "q: expected float16, bfloat16 or float32, got ", q.scalar_type());
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), d = q.size(3);
  TORCH_CHECK(B >= 1 && N >= 1 && H >= 1 && d >= 1, "q: expected B, N, H, d >= 1, got shape ", shape_of(q));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"k", &k}, {"v", &v}}) {
    TORCH_CHECK(t->sizes() == q.sizes(), name, ": expected the shape of q ", shape_of(q), ", got ", shape_of(*t));
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, ": expected the dtype of q (", q.scalar_type(), "), got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), name, ": expected the device of q (", q.device(), "), got ", t->device());
  }
  TORCH_CHECK(reg_k.has_value() == reg_v.has_value(), reg_k.has_value() ? "reg_v" : "reg_k",
              ": KV registers need both reg_k and reg_v");
  int64_t R = 0;
  if (reg_k.has_value()) {
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"reg_k", &*reg_k}, {"reg_v", &*reg_v}}) {
      const bool ok = (t->dim() == 3 && t->size(1) == H && t->size(2) == d) ||
                      (t->dim() == 4 && t->size(0) == B && t->size(2) == H && t->size(3) == d);
      TORCH_CHECK(ok, name, ": expected (R, ", H, ", ", d, ") shared by the batch or (", B, ", R, ", H, ", ", d,
                  ") per batch element, got ", shape_of(*t));
      TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, ": expected the dtype of q (", q.scalar_type(), "), got ",
                  t->scalar_type());
      TORCH_CHECK(t->device() == q.device(), name, ": expected the device of q (", q.device(), "), got ", t->device());
    }
    TORCH_CHECK(reg_k->sizes() == reg_v->sizes(), "reg_v: expected the shape of reg_k ", shape_of(*reg_k), ", got ",
                shape_of(*reg_v));
    R = reg_k->size(-3);
  }
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "scale: expected a finite float > 0, got ", scale);
  TORCH_CHECK(num_prefix >= 0 && num_prefix <= N, "num_prefix: expected 0 <= num_prefix <= N = ", N, ", got ",
              num_prefix);
  return {B, N, H, d, R};
}

int64_t check_layer_norm_args(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps) {
  TORCH_CHECK(x.dim() >= 1, "x: expected at least 1 dim (..., C), got a 0-dim tensor");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x: expected a floating dtype, got ", x.scalar_type());
  const int64_t C = x.size(-1);
  TORCH_CHECK(C >= 1, "x: expected a last dim C >= 1, got shape ", shape_of(x));
  for (const auto& [name, t] : {std::pair<const char*, const OptTensor*>{"weight", &weight}, {"bias", &bias}}) {
    if (!t->has_value()) continue;
    const at::Tensor& p = **t;
    TORCH_CHECK(p.dim() == 1 && p.size(0) == C, name, ": expected shape (", C, ",) (the last dim of x), got ",
                shape_of(p));
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), name, ": expected a floating dtype, got ", p.scalar_type());
    TORCH_CHECK(p.device() == x.device(), name, ": expected the device of x (", x.device(), "), got ", p.device());
  }
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps: expected a finite float >= 0, got ", eps);
  return C;
}

void check_norm_monitor_args(const at::Tensor& x, int64_t num_cls, int64_t num_prefix, const at::Tensor& inner_edges,
                             const at::Tensor& count, const at::Tensor& total, const at::Tensor& total_sq,
                             const at::Tensor& maximum, const at::Tensor& outliers, const at::Tensor& histogram) {
  TORCH_CHECK(x.dim() == 3, "x: the norm monitor expects tokens (B, N, C), got shape ", shape_of(x));
  TORCH_CHECK(0 <= num_cls && num_cls <= num_prefix && num_prefix <= x.size(1),
              "num_prefix: expected 0 <= num_cls <= num_prefix <= N = ", x.size(1), ", got ", num_cls, ", ",
              num_prefix);
  TORCH_CHECK(inner_edges.dim() == 1 && inner_edges.scalar_type() == at::kFloat && inner_edges.device() == x.device(),
              "inner_edges: expected a 1-dim float32 tensor on ", x.device());
  const int64_t bins = inner_edges.numel() + 1;
  const std::pair<const char*, std::pair<const at::Tensor*, at::ScalarType>> buffers[] = {
      {"count", {&count, at::kLong}},         {"total", {&total, at::kDouble}},
      {"total_sq", {&total_sq, at::kDouble}}, {"maximum", {&maximum, at::kFloat}},
      {"outliers", {&outliers, at::kLong}},   {"histogram", {&histogram, at::kLong}}};
  for (const auto& [name, spec] : buffers) {
    const at::Tensor& t = *spec.first;
    const bool hist = std::string(name) == "histogram";
    const bool shape_ok =
        hist ? (t.dim() == 2 && t.size(0) == 3 && t.size(1) == bins) : (t.dim() == 1 && t.size(0) == 3);
    TORCH_CHECK(shape_ok && t.scalar_type() == spec.second && t.device() == x.device() && t.is_contiguous(), name,
                ": expected a contiguous ", spec.second, " tensor of shape ", hist ? "(3, bins)" : "(3,)", " on ",
                x.device(), ", got ", t.scalar_type(), " ", shape_of(t), " on ", t.device());
  }
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  const char* fill = std::getenv("REGKERN_DEBUG_NAN_FILL");
  if (fill != nullptr && fill[0] == '1') {  // integer outputs get a value no kernel writes (-2: below every key)
    if (at::isFloatingType(t.scalar_type())) {
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      t.fill_(-2);
    }
  }
  return t;
}

at::Tensor patches_as_sequence(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3 || x.dim() == 4, "x: expected patch tokens (B, M, C) or (B, Hp, Wp, C), got shape ",
              shape_of(x));
  return x.dim() == 3 ? x : x.reshape({x.size(0), -1, x.size(-1)});
}

EmbedShape check_embed_args(const at::Tensor& x, const OptTensor& pos_embed, const OptTensor& cls_token,
                            const OptTensor& reg_token, bool no_embed_class) {
  const at::Tensor seq = patches_as_sequence(x);
  const int64_t B = seq.size(0), M = seq.size(1), C = seq.size(2);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x: expected a floating dtype, got ", x.scalar_type());
  const bool has_cls = cls_token.has_value();
  const int64_t R = reg_token.has_value() ? reg_token->size(1) : 0;
  const int64_t P = (has_cls ? 1 : 0) + R;
  auto same = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, ": expected the dtype of x (", x.scalar_type(), "), got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), name, ": expected the device of x (", x.device(), "), got ", t.device());
  };
  if (has_cls) {
    TORCH_CHECK(cls_token->dim() == 3 && cls_token->size(0) == 1 && cls_token->size(1) == 1 && cls_token->size(2) == C,
                "cls_token: expected shape (1, 1, ", C, "), got ", shape_of(*cls_token));
    same("cls_token", *cls_token);
  }
  if (reg_token.has_value()) {
    TORCH_CHECK(reg_token->dim() == 3 && reg_token->size(0) == 1 && reg_token->size(2) == C,
                "reg_token: expected shape (1, R, ", C, "), got ", shape_of(*reg_token));
    same("reg_token", *reg_token);
  }
  if (pos_embed.has_value()) {
    const int64_t L = no_embed_class ? M : P + M;
    TORCH_CHECK(pos_embed->dim() == 3 && pos_embed->size(0) == 1 && pos_embed->size(1) == L && pos_embed->size(2) == C,
                "pos_embed: expected shape (1, ", L, ", ", C, ") (",
                no_embed_class ? "patches only" : "prefix + patches", "; resample it to the grid first), got ",
                shape_of(*pos_embed));
    same("pos_embed", *pos_embed);
  }
  return {B, M, C, P, R, has_cls};
}

namespace {

// ---------------------------------------------------------------------------------- CPU references

at::Tensor heads_first_float(const at::Tensor& t) { return t.to(at::kFloat).permute({0, 2, 1, 3}); }

at::Tensor batched_registers(const at::Tensor& reg, int64_t B) {
  return reg.dim() == 3 ? reg.unsqueeze(0).expand({B, -1, -1, -1}) : reg;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, const OptTensor& reg_k,
                                                                 const OptTensor& reg_v, double scale,
                                                                 int64_t num_prefix, bool want_out_norm) {
  const AttentionShape s = check_attention_args(q, k, v, reg_k, reg_v, scale, num_prefix);
  at::Tensor qf = heads_first_float(q), kf = heads_first_float(k), vf = heads_first_float(v);
  if (s.R > 0) {
    kf = at::cat({heads_first_float(batched_registers(*reg_k, s.B)), kf}, 2);
    vf = at::cat({heads_first_float(batched_registers(*reg_v, s.B)), vf}, 2);
  }
  const at::Tensor scores = at::matmul(qf, kf.transpose(-1, -2)) * scale;  // (B, H, N, R + N)
  const at::Tensor lse = at::logsumexp(scores, -1);
  const at::Tensor probs = at::exp(scores - lse.unsqueeze(-1));
  const at::Tensor out_f = at::matmul(probs, vf).transpose(1, 2);  // (B, N, H, d)
  at::Tensor out = out_f.to(q.scalar_type()).contiguous();
  at::Tensor out_norm = want_out_norm ? at::linalg_vector_norm(out_f.reshape({s.B, s.N, s.H * s.d}), 2, {-1})
                                      : at::empty({0}, q.options().dtype(at::kFloat));
  return {out, lse.contiguous(), out_norm.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x,
                                                                              const OptTensor& weight,
                                                                              const OptTensor& bias, double eps) {
  const int64_t C = check_layer_norm_args(x, weight, bias, eps);
  const auto cdtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xf = x.to(cdtype);
  const OptTensor w = weight.has_value() ? OptTensor(weight->to(cdtype)) : OptTensor();
  const OptTensor b = bias.has_value() ? OptTensor(bias->to(cdtype)) : OptTensor();
  at::Tensor y = at::layer_norm(xf, {C}, w, b, eps).to(x.scalar_type()).contiguous();
  at::Tensor norms = at::linalg_vector_norm(xf, 2, {-1}).to(at::kFloat).contiguous();
  auto [var, mean] = at::var_mean(xf, {-1}, /*correction=*/0);
  at::Tensor rstd = at::rsqrt(var + eps).to(at::kFloat).contiguous();
  return {y, norms, mean.to(at::kFloat).contiguous(), rstd};
}

// reference.norm_statistics in ATen, added to the accumulators: the C++ reference of the monitored forward
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_monitored_cpu(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps, int64_t num_cls,
    int64_t num_prefix, double threshold, const at::Tensor& inner_edges, int64_t top_k, bool write_norms,
    at::Tensor& count, at::Tensor& total, at::Tensor& total_sq, at::Tensor& maximum, at::Tensor& outliers,
    at::Tensor& histogram) {
  check_layer_norm_args(x, weight, bias, eps);
  check_norm_monitor_args(x, num_cls, num_prefix, inner_edges, count, total, total_sq, maximum, outliers, histogram);
  auto [y, norms, mean, rstd] = layer_norm_fwd_cpu(x, weight, bias, eps);
  const int64_t B = x.size(0), N = x.size(1), bins = inner_edges.numel() + 1;
  const at::Tensor token = at::arange(N, x.options().dtype(at::kLong));
  const at::Tensor group = ((token >= num_cls).to(at::kLong) + (token >= num_prefix).to(at::kLong)).expand({B, N});
  const at::Tensor g = group.reshape({-1}), flat = norms.reshape({-1});
  const at::Tensor wide = flat.to(at::kDouble);
  count.index_add_(0, g, at::ones_like(g));
  total.index_add_(0, g, wide);
  total_sq.index_add_(0, g, wide * wide);
  outliers.index_add_(0, g, (flat > threshold).to(at::kLong));
  maximum.scatter_reduce_(0, g, flat, "amax", /*include_self=*/true);
  const at::Tensor bucket = at::bucketize(flat, inner_edges);
  histogram.view({-1}).index_add_(0, g * bins + bucket, at::ones_like(bucket));
  // every patch is a top-k candidate: key = norm bits << 32 | flat patch index (reference.patch_norm_keys)
  const at::Tensor patches = norms.narrow(1, num_prefix, N - num_prefix).contiguous().reshape({-1});
  const at::Tensor candidates = at::bitwise_or(at::bitwise_left_shift(patches.view(at::kInt).to(at::kLong), 32),
                                               at::arange(patches.numel(), patches.options().dtype(at::kLong)));
  (void)top_k;
  if (!write_norms) {
    const at::Tensor none = at::empty({0}, norms.options());
    return {y, none, none.clone(), candidates, mean, rstd};
  }
  // copies, not views: op outputs may not alias each other
  return {y,
          norms.narrow(1, 0, num_prefix).clone(at::MemoryFormat::Contiguous),
          norms.narrow(1, num_prefix, N - num_prefix).clone(at::MemoryFormat::Contiguous),
          candidates,
          mean,
          rstd};
}

at::Tensor embed_tokens_cpu(const at::Tensor& x_in, const OptTensor& pos_embed, const OptTensor& cls_token,
                            const OptTensor& reg_token, bool no_embed_class) {
  const EmbedShape s = check_embed_args(x_in, pos_embed, cls_token, reg_token, no_embed_class);
  const auto dtype = x_in.scalar_type();
  const auto cdtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = patches_as_sequence(x_in).to(cdtype);
  std::vector<at::Tensor> prefix;
  if (cls_token.has_value()) prefix.push_back(cls_token->to(cdtype).expand({s.B, -1, -1}));
  if (reg_token.has_value()) prefix.push_back(reg_token->to(cdtype).expand({s.B, -1, -1}));
  at::Tensor seq;
  if (!pos_embed.has_value()) {
    prefix.push_back(x);
    seq = at::cat(prefix, 1);
  } else if (no_embed_class) {
    prefix.push_back(x + pos_embed->to(cdtype));
    seq = at::cat(prefix, 1);
  } else {
    prefix.push_back(x);
    seq = at::cat(prefix, 1) + pos_embed->to(cdtype);
  }
  return seq.to(dtype).contiguous();
}

}  // namespace

TORCH_LIBRARY(regkern, m) {
  m.def(
      "cuda_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? reg_k, Tensor? reg_v, float scale, "
      "int num_prefix, bool want_out_norm) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cuda_layer_norm_fwd_monitored(Tensor x, Tensor? weight, Tensor? bias, float eps, int num_cls, int num_prefix, "
      "float threshold, Tensor inner_edges, int top_k, bool write_norms, Tensor(a!) count, Tensor(b!) total, "
      "Tensor(c!) total_sq, Tensor(d!) maximum, Tensor(e!) outliers, Tensor(f!) histogram) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cuda_embed_tokens(Tensor x, Tensor? pos_embed, Tensor? cls_token, Tensor? reg_token, "
      "bool no_embed_class) -> Tensor");
}

#ifndef REGKERN_EMULATE
TORCH_LIBRARY_IMPL(regkern, CPU, m) {
  m.impl("cuda_attention_fwd", &attention_fwd_cpu);
  m.impl("cuda_layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("cuda_layer_norm_fwd_monitored", &layer_norm_fwd_monitored_cpu);
  m.impl("cuda_embed_tokens", &embed_tokens_cpu);
}
#else
// emulation/emulated_ops.cpp: CPU tensors run the CUDA kernels under the host emulator
TORCH_LIBRARY_IMPL(regkern, CPU, m) {
  m.impl("cuda_attention_fwd", &attention_fwd_cuda);
  m.impl("cuda_layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("cuda_layer_norm_fwd_monitored", &layer_norm_fwd_monitored_cuda);
  m.impl("cuda_embed_tokens", &embed_tokens_cuda);
}
#endif

#ifdef REGKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(regkern, CUDA, m) {
  m.impl("cuda_attention_fwd", &attention_fwd_cuda);
  m.impl("cuda_layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("cuda_layer_norm_fwd_monitored", &layer_norm_fwd_monitored_cuda);
  m.impl("cuda_embed_tokens", &embed_tokens_cuda);
}
#endif

}  // namespace regkern

// A Python module so that `import regkern._C` (or the JIT-built module) loads the library and runs the
// registrations above; its only attribute says whether CUDA kernels were compiled in.
#define REGKERN_STR2(x) #x
#define REGKERN_STR(x) REGKERN_STR2(x)
#define REGKERN_CAT2(a, b) a##b
#define REGKERN_CAT(a, b) REGKERN_CAT2(a, b)

extern "C" PyObject* REGKERN_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, REGKERN_STR(TORCH_EXTENSION_NAME),
                                          "regkern CUDA extension: registers the regkern::cuda_* ops", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef REGKERN_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
