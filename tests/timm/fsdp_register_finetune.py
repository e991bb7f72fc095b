"""Registers-only fine-tune under FSDP2 (``torch.distributed.fsdp.fully_shard``, gloo, CPU). Run by
tests/timm/test_registers.py as

    torchrun --nproc_per_node 2 --standalone tests/timm/fsdp_register_finetune.py

Every rank builds the same tiny ViT (same seed), adds register tokens and KV-only registers (the model gets patched
with regkern), freezes everything else, shards every block and then the root with ``fully_shard``, and trains a few
AdamW steps, each rank on its half of a global batch. A plain single-process copy of the model trains on the whole
global batch alongside. After the steps: every rank holds the same registers (gathered full tensors), they equal the
single-process ones to float tolerance, and every other parameter is bitwise unchanged. Rank 0 prints "FSDP2 OK";
any failed check raises, so torchrun exits non-zero.
"""

from __future__ import annotations

import copy
import gc

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from regkern.nn import RegisterAttentionBase
from regkern.timm.registers import add_registers, freeze_all_but_registers, register_parameters

STEPS = 3
GLOBAL_BATCH = 8
IMG = 32


def gather(t: torch.Tensor) -> list:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.detach().contiguous())
    return out


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if isinstance(p, DTensor) else p


def train_and_check() -> str:
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world >= 2 and GLOBAL_BATCH % world == 0, "run with --nproc_per_node 2 (or a divisor of 8)"

    torch.manual_seed(0)  # identical model on every rank
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, depth=2, num_classes=2)
    add_registers(model, 2, mode="tokens")
    add_registers(model, 2, mode="kv")  # patches the model with regkern
    assert all(isinstance(b.attn, RegisterAttentionBase) for b in model.blocks)
    freeze_all_but_registers(model)
    single = copy.deepcopy(model)  # the single-process run on the whole global batch
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    trainable = register_parameters(model)  # the sharded parameters (fully_shard replaced them)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(names) == 1 + 2 * len(model.blocks), names
    assert all(isinstance(p, DTensor) for p in trainable), [type(p).__name__ for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    single_opt = torch.optim.AdamW(register_parameters(single), lr=1e-2)

    g = torch.Generator().manual_seed(100)  # the same global batches on every rank; each takes its slice
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 3, IMG, IMG, generator=g)
        y = torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)
        mine = slice(rank * share, (rank + 1) * share)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[mine]), y[mine]).backward()  # FSDP averages the ranks' gradients
        for n, p in model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, f"step {step}: frozen {n} got a gradient"
            else:
                assert p.grad is not None and full(p.grad).abs().sum() > 0, f"step {step}: {n} got no gradient"
        opt.step()
        single_opt.zero_grad(set_to_none=True)
        F.cross_entropy(single(x), y).backward()
        single_opt.step()

    single_params = dict(single.named_parameters())
    for n, p in model.named_parameters():
        value = full(p.detach())
        for r, other in enumerate(gather(value)):
            assert torch.equal(other, value), f"rank {rank}: {n} differs from rank {r}"
        if isinstance(p, DTensor):  # this rank's own shard (dim 0, torch.chunk's split) against the single run
            chunks = torch.chunk(single_params[n].detach(), world, dim=0)
            mine = chunks[rank] if rank < len(chunks) else single_params[n][:0]
            torch.testing.assert_close(p.to_local().detach(), mine, atol=1e-6, rtol=1e-4, msg=f"{n}: local shard")
        if p.requires_grad:
            assert not torch.equal(value, initial[n]), f"register parameter {n} did not change"
            torch.testing.assert_close(
                value,
                single_params[n].detach(),
                atol=1e-6,
                rtol=1e-4,
                msg=lambda m, n=n: f"{n}: FSDP2 training differs from single-process training: {m}",
            )
        else:
            assert torch.equal(value, initial[n]), f"frozen {n} changed"
    return f"FSDP2 OK ({world} ranks, {STEPS} steps, {len(trainable)} register parameters)"


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
