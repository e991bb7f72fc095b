"""Input builders and fixtures shared by the tests."""

import subprocess
import sys

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
    return (
        torch.randn(shape, generator=g).to(device=device, dtype=dtype),
        torch.randn(shape, generator=g).to(device=device, dtype=dtype),
    )


def eager_attention(q, k, v, reg_k=None, reg_v=None, scale=None):
    """PyTorch's plain eager attention in the inputs' own precision (no upcast), as timm's unfused path computes it.

    Its error against the float32 reference is "PyTorch's own error at the same precision" in the tolerance rule.
    """
    B, N, H, d = q.shape
    scale = d**-0.5 if scale is None else scale
    if reg_k is not None:
        expand = (lambda r: r.unsqueeze(0).expand(B, -1, -1, -1)) if reg_k.dim() == 3 else (lambda r: r)
        k = torch.cat([expand(reg_k), k], 1)
        v = torch.cat([expand(reg_v), v], 1)
    attn = (q.transpose(1, 2) * scale) @ k.transpose(1, 2).transpose(-1, -2)
    return (attn.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)


DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def dtype_id(dtype) -> str:
    """fp16 / bf16 / fp32 / fp64 for a torch dtype (a string passes through)."""
    return dtype if isinstance(dtype, str) else DTYPE_IDS[dtype]


def case_id(*flags, B=None, N=None, H=None, D=None, C=None, R=None, P=None, dtype=None) -> str:
    """The one helper behind parametrised test ids: shape fields as letter + value in a fixed order, then the dtype,
    then any flags, e.g. ``case_id(B=2, N=261, H=4, D=64, dtype=torch.float16)`` -> ``B2-N261-H4-D64-fp16``.
    Fields left as None and empty flags are omitted."""
    fields = (("B", B), ("N", N), ("H", H), ("D", D), ("C", C), ("R", R), ("P", P))
    parts = [f"{name}{value}" for name, value in fields if value is not None]
    if dtype is not None:
        parts.append(dtype_id(dtype))
    parts += [str(f) for f in flags if f not in (None, "")]
    return "-".join(parts)


def attention_case_id(case):
    """Id of an attention test case (B, N, H, d, R, shared, P), e.g. B2-N261-H4-D64-R4s-P5 (s: registers shared by
    the batch, b: per batch element)."""
    B, N, H, d, R, shared, P = case
    return case_id(B=B, N=N, H=H, D=d, R=f"{R}{'s' if shared else 'b'}", P=P)


def max_error(x, ref):
    return (x.float() - ref.float()).abs().max().item()


def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Make every parameter non-trivial (random init leaves exact zeros/ones and 1e-5 layer scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def naflex_batch(grids, seed=0, patch=16):
    """Random patches of images with patch grids ``grids`` [(gh, gw), ...], padded to the largest count: the dict
    NaFlex models take (patches (B, N, patch * patch * 3), patch_coord (B, N, 2), patch_valid (B, N)); on the CPU."""
    g = torch.Generator().manual_seed(seed)
    N = max(gh * gw for gh, gw in grids)
    patches = torch.randn(len(grids), N, patch * patch * 3, generator=g)
    coord = torch.zeros(len(grids), N, 2, dtype=torch.long)
    valid = torch.zeros(len(grids), N, dtype=torch.bool)
    for i, (gh, gw) in enumerate(grids):
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        coord[i, : gh * gw] = torch.stack([ys.flatten(), xs.flatten()], -1)
        valid[i, : gh * gw] = True
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid}


def torchrun(script, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script`` under ``torchrun --nproc_per_node nproc --standalone`` (this Python); assert it exited 0, with the
    end of its output in the message. Returns the completed process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone", str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result
