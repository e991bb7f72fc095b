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


# -------------------------------------------------------------------------- errors, not tracebacks


@pytest.fixture
def picture(tmp_path):
    from PIL import Image

    path = tmp_path / "picture.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(path)
    return path


def _command(name: str, picture, *extra: str) -> list[str]:
    """``regkern demo`` or ``regkern inspect`` at a tiny size, with ``extra`` options."""
    if name == "demo":
        return ["demo", "--img-size", "28", "--batch-size", "1", "--repeats", "1", *extra]
    return ["inspect", str(picture), "--img-size", "28", "--out", str(picture.parent / "out"), *extra]


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"regkern {command}: error: "), err
    return lines[0][len(f"regkern {command}: error: ") :]


@pytest.mark.parametrize("command", ["demo", "inspect"])
def test_cuda_device_without_a_gpu_is_an_error_before_the_model_is_built(command, picture, capsys, monkeypatch):
    from regkern.apps import demo, inspect

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for module in (demo, inspect):
        monkeypatch.setattr(module, "create_model", lambda *a, **k: pytest.fail("model built before --device check"))
    for device in ("cuda", "cuda:0"):
        assert cli.main(_command(command, picture, "--device", device)) == 2
        assert _one_error_line(capsys, command) == (
            f"--device: {device} requested but no CUDA GPU is available (torch.cuda.is_available() is False)"
        )


@pytest.mark.parametrize("command", ["demo", "inspect"])
@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", "cpu:0", ""])
def test_unknown_device_is_an_error(command, device, picture, capsys):
    assert cli.main(_command(command, picture, "--device", device)) == 2
    assert _one_error_line(capsys, command) == f"--device: expected cpu, cuda or cuda:N, got {device!r}"


@pytest.mark.parametrize("command", ["demo", "inspect"])
def test_unknown_model_is_an_error(command, picture, capsys):
    assert cli.main(_command(command, picture, "--model", "vit_smal_patch14_reg4_dinov2")) == 2
    message = _one_error_line(capsys, command)
    assert message.startswith("--model: timm has no model named 'vit_smal_patch14_reg4_dinov2'")
    assert "vit_small_patch14_reg4_dinov2" in message.split("(close:")[1]  # the likely meant name


def _corrupt_checkpoints(folder):
    """Files that torch.load or safetensors cannot read, each failing its own way."""
    from safetensors.torch import save_file

    good = folder / "good.safetensors"
    save_file({"w": torch.zeros(4)}, str(good))
    torch.save({"w": torch.zeros(4)}, folder / "good.pth")
    files = {
        "garbage.pth": b"definitely not a checkpoint",  # pickle: invalid load key / unsupported operand
        "empty.pth": b"",  # EOFError
        "truncated.pth": (folder / "good.pth").read_bytes()[:200],  # zip: central directory missing
        "garbage.safetensors": b"\xff" * 64,  # SafetensorError: header too large
        "truncated.safetensors": good.read_bytes()[:-8],  # SafetensorError: incomplete metadata
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


@pytest.mark.parametrize("command", ["demo", "inspect"])
def test_unreadable_checkpoints_are_errors(command, picture, tmp_path, capsys):
    bad = tmp_path / "checkpoints"
    bad.mkdir()
    for path in _corrupt_checkpoints(bad):
        assert cli.main(_command(command, picture, "--checkpoint", str(path))) == 2, path
        assert _one_error_line(capsys, command).startswith(f"--checkpoint: cannot read {path}: "), path


@pytest.mark.parametrize("command", ["demo", "inspect"])
def test_mismatched_checkpoints_are_errors(command, picture, tmp_path, capsys):
    timm = pytest.importorskip("timm")
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)  # another width, no registers
    torch.save(other.state_dict(), tmp_path / "other.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    assert cli.main(_command(command, picture, "--checkpoint", str(tmp_path / "other.pth"))) == 2
    assert _one_error_line(capsys, command).startswith(f"--checkpoint: {tmp_path / 'other.pth'} does not match")
    assert cli.main(_command(command, picture, "--checkpoint", str(tmp_path / "list.pth"))) == 2
    assert _one_error_line(capsys, command) == f"--checkpoint: {tmp_path / 'list.pth'} holds a list, not a state_dict"


@pytest.mark.parametrize("command", ["demo", "inspect"])
def test_a_model_in_which_nothing_was_patched_is_refused_with_the_reason(command, picture, capsys, monkeypatch):
    """Without a supported family (simulated: regkern supports nothing), demo and inspect refuse the model with
    patch_timm's warning rather than timing timm against itself."""
    import regkern.timm.patching as patching

    monkeypatch.setattr(patching, "supported_attention_classes", lambda: {})
    assert cli.main(_command(command, picture, "--model", "vit_pwee_patch16_reg1_gap_256")) == 2
    message = _one_error_line(capsys, command)
    assert message.startswith("--model: regkern patched nothing in vit_pwee_patch16_reg1_gap_256 (regkern: left ")
    assert "ParallelScalingBlock" in message


def test_patch_or_refuse_names_models_without_attention():
    import timm

    from regkern.apps.demo import patch_or_refuse

    with pytest.raises(ValueError, match="patched nothing in resnet10t .*no attention module of a family"):
        patch_or_refuse(timm.create_model("resnet10t", pretrained=False), "resnet10t")
