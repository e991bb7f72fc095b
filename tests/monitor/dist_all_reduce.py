"""NormMonitor.all_reduce across ranks (gloo, CPU). Run by tests/monitor/test_monitor.py as

    torchrun --nproc_per_node 2 --standalone tests/monitor/dist_all_reduce.py

Every rank builds the same tiny register ViT with a planted high-norm artifact and monitors its own images (rank
dependent, tracked with global sample ids). After ``all_reduce`` every rank's report must equal the report of one
monitor that saw every rank's images (computed on each rank, batch by batch as the ranks did, so the norms are the
same bits): counts, histograms and outliers identical, sums to float tolerance, the same top patches. A second call
changes nothing; more batches then another call count each image once; a rank that saw no image reports the
gathered top patches too. Rank 0 prints "ALL_REDUCE OK".
"""

from __future__ import annotations

import math

import timm
import torch
import torch.distributed as dist

from regkern import NormMonitor

IMG, DEPTH, BATCH = 28, 3, 2


def build():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=IMG, depth=DEPTH).eval()

    def plant(_module, args):  # patch 1 of image 0 of every batch: a high-norm token from block 1 on
        x = args[0].clone()
        x[0, model.num_prefix_tokens + 1] *= 80.0
        return (x,) + args[1:]

    model.blocks[1].register_forward_pre_hook(plant)
    return model


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.arange(BATCH, dtype=torch.int64) + BATCH * (rank + 10 * step)
    return torch.randn(BATCH, 3, IMG, IMG, generator=g) * (1 + rank + step), ids


def run(monitor: NormMonitor, batches) -> None:
    for x, ids in batches:
        monitor.track_samples(ids)
        with torch.no_grad():
            monitor.model(x)


def check_equal(got, want, what: str) -> None:
    for a, b in zip(got.rows, want.rows):
        for key in ("count", "outliers", "histogram"):
            assert a[key] == b[key], f"{what}: layer {a['layer']} {a['group']} {key}: {a[key]} != {b[key]}"
        for key in ("mean", "std", "max"):
            assert math.isclose(a[key], b[key], rel_tol=1e-9, abs_tol=1e-9), f"{what}: {key} {a} != {b}"
    for a, b in zip(got.attention_share, want.attention_share):
        assert all(math.isclose(a[k], b[k], rel_tol=1e-9) for k in a), f"{what}: attention share {a} != {b}"
    assert [[(i, t) for _, i, t in layer] for layer in got.top_patches] == [
        [(i, t) for _, i, t in layer] for layer in want.top_patches
    ], f"{what}: top patches {got.top_patches} != {want.top_patches}"
    assert got.top_patches_scope == "since reset"


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world >= 2, "run with --nproc_per_node 2 (or more)"

    monitor = NormMonitor(build(), top_k=3)
    run(monitor, [batch(rank, 0)])
    everyone = NormMonitor(build(), top_k=3)  # one monitor that sees every rank's batches
    run(everyone, [batch(r, 0) for r in range(world)])

    monitor.all_reduce()
    check_equal(monitor.report(), everyone.report(), "after all_reduce")
    assert monitor.report().rows[0]["count"] == world * BATCH, monitor.report().rows[0]
    monitor.all_reduce()
    check_equal(monitor.report(), everyone.report(), "after a second all_reduce")

    run(monitor, [batch(rank, 1)])  # more data after a reduce: counted once by the next reduce
    run(everyone, [batch(r, 1) for r in range(world)])
    monitor.all_reduce()
    monitor.all_reduce()
    check_equal(monitor.report(), everyone.report(), "after more batches and two more all_reduce calls")
    top = monitor.report().top_patches[DEPTH - 1]
    assert top[0][0] > 150 and top[0][2] == 1 + monitor.num_prefix, top  # the planted patch leads

    # a rank that saw no image (and so never tracked) still reports the gathered top patches
    lonely = NormMonitor(build(), top_k=3)
    if rank == 0:
        run(lonely, [batch(0, 2)])
    lonely.all_reduce()
    alone = NormMonitor(build(), top_k=3)
    run(alone, [batch(0, 2)])
    check_equal(lonely.report(), alone.report(), f"rank {rank} after a reduce where only rank 0 saw images")

    dist.barrier()
    if rank == 0:
        print(f"ALL_REDUCE OK ({world} ranks)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
