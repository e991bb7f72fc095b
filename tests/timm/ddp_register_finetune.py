"""Registers-only fine-tune under DistributedDataParallel (gloo, CPU). Run by tests/timm/test_registers.py as

    torchrun --nproc_per_node 2 --standalone tests/timm/ddp_register_finetune.py

Every rank builds the same tiny ViT (same seed), adds register tokens and KV-only registers (the model gets patched
with regkern), freezes everything else, wraps it in DDP and trains a few steps on rank-dependent data. After every
backward it checks, across ranks (all_gather), that the register gradients are identical and equal to the mean of the
ranks' local gradients (computed with a plain, unwrapped copy of the model), that frozen parameters got no gradient,
and after every step that all parameters are identical on all ranks and that frozen ones did not move. Rank 0 prints
"DDP OK" at the end; any failed check raises, so torchrun exits non-zero.
"""

from __future__ import annotations

import copy
import gc

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from regkern.timm.registers import add_registers, freeze_all_but_registers, register_parameters

STEPS = 3
BATCH = 4
IMG = 32


def gather(t: torch.Tensor) -> list:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.detach().contiguous())
    return out


def assert_same_on_all_ranks(t: torch.Tensor, what: str) -> None:
    for rank, other in enumerate(gather(t)):
        assert torch.equal(other, t), f"rank {dist.get_rank()}: {what} differs from rank {rank}"


def train_and_check() -> str:
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world >= 2, "run with --nproc_per_node 2 (or more)"

    torch.manual_seed(0)  # identical model on every rank
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, depth=2, num_classes=2)
    add_registers(model, 2, mode="tokens")
    add_registers(model, 2, mode="kv")  # patches the model with regkern
    trainable = freeze_all_but_registers(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == [n for n, _ in model.named_parameters() if n.rpartition(".")[2] in ("reg_token", "reg_k", "reg_v")]
    assert len(trainable) == 1 + 2 * len(model.blocks), names
    local = copy.deepcopy(model)  # same weights, no DDP: the per-rank gradients DDP must average
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}

    ddp = DDP(model)
    assert [id(p) for p in register_parameters(ddp)] == [id(p) for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2)

    g = torch.Generator().manual_seed(100 + rank)  # rank-dependent data
    for step in range(STEPS):
        x = torch.randn(BATCH, 3, IMG, IMG, generator=g)
        y = torch.randint(0, 2, (BATCH,), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()

        local.load_state_dict(model.state_dict())
        local.zero_grad(set_to_none=True)
        F.cross_entropy(local(x), y).backward()
        local_grads = {n: p.grad for n, p in local.named_parameters() if p.requires_grad}

        differs = False
        for n, p in model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, f"step {step}: frozen {n} got a gradient"
                continue
            assert p.grad is not None and p.grad.abs().sum() > 0, f"step {step}: {n} got no gradient"
            assert_same_on_all_ranks(p.grad, f"step {step}: gradient of {n}")
            per_rank = gather(local_grads[n])
            torch.testing.assert_close(
                p.grad,
                torch.stack(per_rank).mean(0),
                atol=1e-6,
                rtol=1e-4,
                msg=lambda m, n=n, step=step: f"step {step}: {n} is not the mean of the ranks: {m}",
            )
            differs |= any(not torch.equal(per_rank[0], other) for other in per_rank[1:])
        assert differs, "the ranks' local gradients are all equal: the data is not rank-dependent"

        opt.step()
        for n, p in model.named_parameters():
            assert_same_on_all_ranks(p, f"step {step}: parameter {n}")
            if not p.requires_grad:
                assert torch.equal(p, initial[n]), f"step {step}: frozen {n} changed"
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, initial[n]), f"register parameter {n} did not change"
    return f"DDP OK ({world} ranks, {STEPS} steps, {len(trainable)} register parameters)"


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    summary = train_and_check()
    # The wrapped model, its optimizer and their pending gloo work are gone before the group is: a gloo work object
    # freed during interpreter shutdown can abort the process after every check passed.
    gc.collect()
    dist.barrier()
    if dist.get_rank() == 0:
        print(summary, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
