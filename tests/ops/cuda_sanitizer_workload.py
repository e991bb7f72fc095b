"""Every CUDA kernel of the extension once at ragged shapes: the workload tests/ops/test_gpu_cuda.py runs under
compute-sanitizer (memcheck, racecheck, initcheck). Run from the repository root on a GPU."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import regkern  # noqa: E402
from tests.helpers import packed_qkv, registers  # noqa: E402

assert regkern.cuda_ext.load().with_cuda, regkern.cuda_ext.why_unavailable()
for dtype in (torch.bfloat16, torch.float16):
    for B, N, H, d, R, P in [
        (2, 1, 2, 64, 0, 0),
        (2, 17, 3, 64, 4, 5),
        (1, 261, 2, 128, 16, 5),
        (1, 197, 2, 64, 70, 1),
    ]:
        q, k, v = packed_qkv(B, N, H, d, dtype=dtype, device="cuda")
        reg_k, reg_v = registers(B, R, H, d, shared=False, dtype=dtype, device="cuda")
        torch.ops.regkern.cuda_attention_fwd(q, k, v, reg_k, reg_v, d**-0.5, P, True)
    for shape in [(3, 17, 768), (2, 5, 100)]:
        x = torch.randn(shape, device="cuda", dtype=dtype)
        torch.ops.regkern.cuda_layer_norm_fwd(x, torch.randn(shape[-1], device="cuda"), None, 1e-6)
    x = torch.randn(2, 3, 5, 64, device="cuda", dtype=dtype)

    def tokens(*s, dtype=dtype):
        return torch.randn(*s, device="cuda", dtype=dtype)

    torch.ops.regkern.cuda_embed_tokens(x, tokens(1, 20, 64), tokens(1, 1, 64), tokens(1, 4, 64), False)
    torch.ops.regkern.cuda_embed_tokens(x, tokens(1, 15, 64), None, tokens(1, 4, 64), True)
torch.cuda.synchronize()
print("ok")
