"""Input builders and fixtures shared by the tests."""

import pytest
import torch


def packed_qkv(B, N, H, d, dtype=torch.float32, device="cpu", seed=0):
    """q, k, v as strided (B, N, H, d) views of one packed (B, N, 3, H, d) tensor, like a qkv Linear output."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, d, generator=g).to(device=device, dtype=dtype)
    return qkv.unbind(2)


def registers(B, R, H, d, shared, dtype=torch.float32, device="cpu", seed=1):
    if R == 0:
        return None, None
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (R, H, d) if shared else (B, R, H, d)
    return (torch.randn(shape, generator=g).to(device=device, dtype=dtype),
            torch.randn(shape, generator=g).to(device=device, dtype=dtype))


def eager_attention(q, k, v, reg_k=None, reg_v=None, scale=None):
    """PyTorch's plain eager attention in the inputs' own precision (no upcast), as timm's unfused path computes it.

    Its error against the float32 reference is "PyTorch's own error at the same precision" in the tolerance rule.
    """
    B, N, H, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    if reg_k is not None:
        expand = (lambda r: r.unsqueeze(0).expand(B, -1, -1, -1)) if reg_k.dim() == 3 else (lambda r: r)
        k = torch.cat([expand(reg_k), k], 1)
        v = torch.cat([expand(reg_v), v], 1)
    attn = (q.transpose(1, 2) * scale) @ k.transpose(1, 2).transpose(-1, -2)
    return (attn.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)


def attention_case_id(case):
    """Readable id of an attention test case (B, N, H, d, R, shared, P), e.g. B2-N261-H4-D64-R4s-P5."""
    B, N, H, d, R, shared, P = case
    return f"B{B}-N{N}-H{H}-D{d}-R{R}{'s' if shared else 'b'}-P{P}"


def max_error(x, ref):
    return (x.float() - ref.float()).abs().max().item()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run a handful of tokens: one thread is fastest and avoids OpenMP spin contention that makes every
    small op take milliseconds when other processes share the two cores. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Make every parameter non-trivial (random init leaves exact zeros/ones and 1e-5 layer scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model
