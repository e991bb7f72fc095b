"""``regkern inspect`` end to end on the CPU with a tiny input size: every promised file, broken images skipped."""

import json

import pytest
import torch

from regkern.apps import cli

pytest.importorskip("timm")


@pytest.fixture
def image_dir(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        Image.fromarray((torch.rand(40 + 10 * i, 50, 3, generator=g) * 255).byte().numpy()).save(folder / f"im{i}.png")
    (folder / "broken.jpg").write_bytes(b"definitely not a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder


def test_inspect_writes_every_file_and_skips_broken_images(tmp_path, image_dir, capsys):
    out_dir = tmp_path / "out"
    code = cli.main(
        ["inspect", str(image_dir), "--img-size", "56", "--batch-size", "2", "--out", str(out_dir), "--plant", "2"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    text = captured.out + captured.err
    assert "skipping" in text and "broken.jpg" in text
    assert "3 images inspected" in captured.out and "largest patch norms" in captured.out
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == sorted(
        ["norms.json", "norm_histograms.png"]
        + [f"norm_map_000{i}_im{i}.png" for i in range(3)]
        + [f"attention_000{i}_im{i}.png" for i in range(3)]
    )
    for name in names:
        if name.endswith(".png"):
            assert (out_dir / name).read_bytes()[:4] == b"\x89PNG", name
    report = json.loads((out_dir / "norms.json").read_text())
    patches = [r for r in report["rows"] if r["group"] == "patches"]
    assert [r["outliers"] for r in patches] == [0, 0] + [6] * 10  # 2 planted tokens x 3 images from block 2 on
    assert sum(patches[0]["histogram"]) == patches[0]["count"] == 3 * 16


def test_inspect_errors_are_clear(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"xx")
    assert cli.main(["inspect", str(tmp_path / "bad.png"), "--img-size", "28", "--out", str(tmp_path / "o")]) == 2
    assert "none of the files could be read" in capsys.readouterr().err
