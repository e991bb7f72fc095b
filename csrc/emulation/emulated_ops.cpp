// The CUDA sources of csrc/ compiled for the host emulator (cuda_emulator.h), as the ops
// regkern_emulated::cuda_attention_fwd / cuda_layer_norm_fwd / cuda_embed_tokens on CPU tensors: the same kernels
// and launchers, run thread by thread. Built just in time by tests/ops/test_cuda_emulated.py; not part of regkern._C.
#define REGKERN_EMULATE 1
#define regkern regkern_emulated  // a namespace (and op library) of its own beside the real extension

#include "../ops.cpp"
#include "../attention.cu"
#include "../layer_norm.cu"
#include "../embed_tokens.cu"
