"""The demo job: ``python -m regkern demo`` end to end on the CPU at a small size."""

import subprocess
import sys

import pytest
import torch

from regkern.apps import cli
from regkern.apps.demo import load_checkpoint


def test_demo_cli_runs_and_prints_table():
    cmd = [
        sys.executable,
        "-m",
        "regkern",
        "demo",
        "--model",
        "vit_small_patch14_reg4_dinov2",
        "--img-size",
        "56",
        "--batch-size",
        "2",
        "--repeats",
        "1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for expected in (
        "device: cpu",
        "backend torch",
        "unpatched",
        "patched",
        "max |patched - unpatched|",
        "cannot be downloaded offline",
        "patch mean",
        "1 CLS + 4 registers",
    ):
        assert expected in text, (expected, text)
    table_rows = [line.split("|")[0].strip() for line in text.splitlines() if line.count("|") == 6]
    assert table_rows[1:] == [str(i) for i in range(12)] + ["out"]  # header, 12 blocks, after the last
    diff_line = next(line for line in text.splitlines() if line.startswith("max |patched"))
    assert float(diff_line.split(":")[1]) < 1e-5


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_demo_loads_local_checkpoint(tmp_path, capsys, fmt):
    timm = pytest.importorskip("timm")
    torch.manual_seed(123)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    path = tmp_path / f"weights.{fmt}"
    if fmt == "pth":
        torch.save({"state_dict": model.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    assert "loaded" in load_checkpoint(fresh, path)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    code = cli.main(
        [
            "demo",
            "--model",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--batch-size",
            "2",
            "--repeats",
            "1",
            "--checkpoint",
            str(path),
        ]
    )
    assert code == 0
    assert f"weights: loaded {path}" in capsys.readouterr().out


def test_demo_reads_images_and_skips_broken_files(tmp_path, capsys):
    from PIL import Image

    for i in range(2):
        Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    code = cli.main(
        [
            "demo",
            "--model",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--batch-size",
            "4",
            "--repeats",
            "1",
            "--images",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "skipping broken.jpg" in out and "2 images from" in out


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli.main(["demo", "--checkpoint", str(tmp_path / "missing.pth"), "--img-size", "28"]) == 2
    assert "--checkpoint: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    torch.save({"nonsense": torch.zeros(1)}, bad)
    assert cli.main(["demo", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--checkpoint", str(bad)]) == 2
    assert "does not match the model" in capsys.readouterr().err


def test_demo_monitor_finds_planted_artifacts_and_writes_attention_map(tmp_path, capsys):
    png = tmp_path / "maps.png"
    code = cli.main(
        [
            "demo",
            "--img-size",
            "56",
            "--batch-size",
            "2",
            "--repeats",
            "1",
            "--monitor",
            "--plant",
            "3",
            "--attention-map",
            str(png),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    rows = [line.split("|") for line in out.splitlines() if line.count("|") == 7 and "patches" in line]
    outliers = [int(r[6]) for r in rows]
    assert outliers == [0, 0, 0] + [4] * 9  # 2 planted tokens x 2 images, from block 3 on
    assert "synthetic artifacts" in out and "largest patch norms" in out
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["demo", "--img-size", "56", "--attention-map", str(png)]) == 2
    assert "--attention-map needs --monitor" in capsys.readouterr().err
