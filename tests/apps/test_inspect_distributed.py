"""``regkern inspect`` at any scale: one process and two gloo ranks under torchrun give the same norms.json; rank 0
alone writes; the shards are disjoint; the scaling options check their values."""

import json
import subprocess
import sys

import pytest
import torch

from regkern.apps import cli
from regkern.apps.distributed import default_workers, join
from regkern.apps.inspect import DisjointShardSampler

pytest.importorskip("timm")

COMMON = ["--img-size", "56", "--batch-size", "2", "--plant", "2", "--workers", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("dataset")
    g = torch.Generator().manual_seed(0)
    for i in range(8):  # ragged sizes: every image is resized and cropped differently
        pixels = (torch.rand(40 + 7 * i, 50 + 3 * i, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"im{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")  # first in the sorted folder: rank 0 skips it
    return folder


def _inspect(argv, out_dir, processes):
    launcher = [sys.executable, "-m", "regkern"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone"]
        launcher += ["-m", "regkern"]
    result = subprocess.run(
        launcher + ["inspect", *argv, "--out", str(out_dir)], capture_output=True, text=True, timeout=600
    )
    log = result.stdout[-6000:] + result.stderr[-6000:]
    assert result.returncode == 0, log
    return result, json.loads((out_dir / "norms.json").read_text())


def test_one_process_and_two_gloo_ranks_write_the_same_report(tmp_path, image_folder):
    # 9 files, --max-images 8 (global): the broken file and im0..im6 are read, 4 files on rank 0 and 4 on rank 1
    argv = [str(image_folder), *COMMON, "--max-images", "8"]
    single, one = _inspect([*argv, "--max-figures", "0"], tmp_path / "one", 1)  # statistics only: faster
    double, two = _inspect(argv, tmp_path / "two", 2)

    assert one["run"]["world_size"] == 1 and two["run"]["world_size"] == 2
    for key in ("files", "images", "skipped"):
        assert one["run"][key] == two["run"][key], key
    assert one["run"]["images"] == 7 and one["run"]["skipped"] == [str(image_folder / "broken.jpg")]
    assert one["bin_edges"] == two["bin_edges"]
    assert len(one["rows"]) == len(two["rows"]) == 12 * 3
    for a, b in zip(one["rows"], two["rows"]):
        where = f"layer {a['layer']} {a['group']}"
        for key in ("layer", "group", "count", "histogram", "outliers"):
            assert a[key] == b[key], f"{where}: {key}"
        for key in ("mean", "std", "max"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), f"{where}: {key}"
    patches = [r for r in one["rows"] if r["group"] == "patches"]
    assert [r["outliers"] for r in patches] == [0, 0] + [14] * 10  # 2 planted tokens x 7 images from block 2 on
    for a, b in zip(one["attention_share"], two["attention_share"]):
        assert a == pytest.approx(b, rel=1e-6)
    assert one["top_patches_scope"] == two["top_patches_scope"] == "since reset"
    for layer_one, layer_two in zip(one["top_patches"], two["top_patches"]):
        assert [(p["file"], p["token"], p["row"], p["col"]) for p in layer_one] == [
            (p["file"], p["token"], p["row"], p["col"]) for p in layer_two
        ]
        assert [p["norm"] for p in layer_one] == pytest.approx([p["norm"] for p in layer_two], rel=1e-6)
    planted_files = {p["file"] for p in one["top_patches"][-1]}
    assert len(planted_files) > 1 and planted_files <= {str(image_folder / f"im{i}.png") for i in range(7)}

    # rank 0 alone prints and writes: one report, its shard's figures (files 0, 2, 4, 6 -> images im1, im3, im5)
    assert double.stdout.count("images inspected") == 1 and double.stdout.count("residual-stream token norms") == 1
    assert "over 2 ranks" in double.stdout and "throughput:" in single.stdout
    assert "skipping" in double.stdout + double.stderr and "broken.jpg" in double.stdout + double.stderr
    written = sorted(p.name for p in (tmp_path / "two").iterdir())
    figures = [f"{kind}_{i:04d}_im{i - 1}.png" for i in (2, 4, 6) for kind in ("attention", "norm_map")]
    assert written == sorted(["norms.json", "norm_histograms.png"] + figures)


def test_a_rank_that_reads_no_image_still_reports_the_named_top_patches(tmp_path, image_folder):
    # file 0 (broken) is rank 0's whole shard, file 1 rank 1's: rank 0 writes what rank 1 found
    argv = [str(image_folder / "broken.jpg"), str(image_folder / "im0.png"), *COMMON]
    result, report = _inspect(argv, tmp_path / "out", 2)
    assert report["run"]["images"] == 1 and report["top_patches_scope"] == "since reset"
    last = report["top_patches"][-1]
    assert last and {p["file"] for p in last} == {str(image_folder / "im0.png")}
    assert "largest patch norms of all images: " in result.stdout and "im0.png" in result.stdout


def test_disjoint_shards_cover_every_file_once():
    for n in (0, 1, 7, 8):
        for world in (1, 2, 3):
            shards = [list(DisjointShardSampler(n, r, world)) for r in range(world)]
            assert sorted(i for s in shards for i in s) == list(range(n)), (n, world)
            assert [len(s) for s in shards] == [len(DisjointShardSampler(n, r, world)) for r in range(world)]


def test_one_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = join("cpu")
    assert (context.rank, context.world_size, context.is_main, context.backend) == (0, 1, True, None)
    context.close()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE: expected an integer"):
        join("cpu")
    assert 0 <= default_workers(1) <= 4 and default_workers(10**6) == 0


@pytest.mark.parametrize(
    "flag, value, message",
    [("--workers", "-1", "--workers: expected >= 0"), ("--max-figures", "-2", "--max-figures: expected >= 0")],
)
def test_scaling_options_are_checked(tmp_path, image_folder, capsys, flag, value, message):
    assert cli.main(["inspect", str(image_folder), flag, value, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_max_figures_limits_the_per_image_figures(tmp_path, image_folder):
    out_dir = tmp_path / "out"
    argv = ["inspect", str(image_folder), *COMMON, "--workers", "0", "--max-figures", "1", "--max-images", "4"]
    assert cli.main(argv + ["--out", str(out_dir)]) == 0
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["attention_0001_im0.png", "norm_histograms.png", "norm_map_0001_im0.png", "norms.json"]
    report = json.loads((out_dir / "norms.json").read_text())
    assert report["run"]["images"] == 3 and report["rows"][0]["count"] == 3


@pytest.mark.gpu
def test_inspect_on_the_gpu_with_workers_and_pinned_memory(tmp_path, image_folder):
    argv = [str(image_folder), "--img-size", "56", "--batch-size", "3", "--plant", "2", "--workers", "2"]
    result, report = _inspect([*argv, "--device", "cuda"], tmp_path / "gpu", 1)
    assert report["run"]["images"] == 8 and report["rows"][0]["count"] == 8
    patches = [r for r in report["rows"] if r["group"] == "patches"]
    assert [r["outliers"] for r in patches] == [0, 0] + [16] * 10
    assert "throughput:" in result.stdout
