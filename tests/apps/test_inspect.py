"""``regkern inspect`` end to end on the CPU with a tiny input size: every promised file, broken images skipped, the
panels show what the model saw (its crop, the threshold, colour scales), any image mode reads correctly."""

import contextlib
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from regkern.apps import cli
from regkern.apps.images import model_view, to_rgb
from regkern.apps.plotting import pyplot

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
        + [f"norm_map_000{i + 1}_im{i}.png" for i in range(3)]
        + [f"attention_000{i + 1}_im{i}.png" for i in range(3)]
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


# -------------------------------------------------------------------------- what the model saw


def _thirds(width: int = 180, height: int = 40):
    """A wide RGB image: left third red, middle green, right third blue. The model's centre crop keeps only green."""
    from PIL import Image

    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    third = width // 3
    pixels[:, :third, 0] = 255
    pixels[:, third : 2 * third, 1] = 255
    pixels[:, 2 * third :, 2] = 255
    return Image.fromarray(pixels)


def _transform(size: int):
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=size)
    config = resolve_data_config({"input_size": (3, size, size), "crop_pct": 1.0}, model=model)
    return create_transform(**config), config


def test_model_view_is_the_centre_crop_the_model_received():
    from PIL import Image

    transform, config = _transform(56)
    picture = _thirds()
    view = model_view(transform(picture), config["mean"], config["std"])
    assert view.shape == (56, 56, 3) and view.dtype == np.uint8
    # only the green middle third survives the crop (squashing the whole picture would show red and blue)
    assert view[..., 1].min() >= 250 and view[..., 0].max() <= 5 and view[..., 2].max() <= 5
    # the same as resizing the shorter side and cropping the PIL image, up to rounding
    resized = picture.resize((252, 56), Image.BICUBIC)
    cropped = np.asarray(resized.crop((98, 0, 154, 56)))
    assert np.abs(view.astype(int) - cropped.astype(int)).max() <= 2


def _deep_gradient():
    """A 16-bit grayscale picture, dark on the left, bright on the right."""
    from PIL import Image

    return Image.fromarray(np.tile(np.linspace(0, 65535, 56).astype(np.uint16), (56, 1)))


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    """One inspect run (they take seconds) over a 16-bit PNG, a wide RGB picture, a broken file and a file beyond
    --max-images, keeping the figures it draws open (its ``plt.close(fig)`` only records them)."""
    folder = tmp_path_factory.mktemp("inspected")
    _deep_gradient().save(folder / "deep.png")
    _thirds().save(folder / "wide.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    _thirds().save(folder / "extra.png")
    images = [folder / name for name in ("deep.png", "wide.png", "broken.jpg", "extra.png")]
    argv = ["inspect", *map(str, images), "--img-size", "56", "--max-images", "3", "--threshold", "123"]
    plt = pyplot()
    figures, out, err = [], io.StringIO(), io.StringIO()
    close = plt.close
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(plt, "close", figures.append)
        code = cli.main(argv + ["--out", str(folder / "out")])
    yield SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue(), figures=figures, folder=folder)
    for fig in figures:
        close(fig)


def _norm_map_figures(run):
    return [f for f in run.figures if len(f.axes) == 3]  # image, norm map, its colour bar


def test_norm_map_panel_shows_the_model_input_aligned_with_the_norms(inspected):
    assert inspected.code == 0, inspected.err
    fig = _norm_map_figures(inspected)[1]  # deep.png, then wide.png
    picture, norms = fig.axes[0].images[0], fig.axes[1].images[0]
    transform, config = _transform(56)
    expected = model_view(transform(_thirds()), config["mean"], config["std"])
    assert np.array_equal(np.asarray(picture.get_array()), expected)
    assert norms.get_array().shape == (4, 4)  # 56 px / patch 14
    # both panels span the same 56 x 56 pixels: each norm cell covers its patch's 14 x 14 pixels
    assert tuple(picture.get_extent()) == tuple(norms.get_extent()) == (0, 56, 56, 0)
    # the saved file: its image panel (left half) has no red or blue, which only squashing would show
    from PIL import Image

    saved = Image.open(inspected.folder / "out" / "norm_map_0001_wide.png").convert("RGB")
    left = np.asarray(saved).astype(int)[:, : saved.width // 2]
    red = (left[..., 0] > 200) & (left[..., 1] < 60) & (left[..., 2] < 60)
    blue = (left[..., 2] > 200) & (left[..., 0] < 60) & (left[..., 1] < 60)
    green = (left[..., 1] > 200) & (left[..., 0] < 60) & (left[..., 2] < 60)
    assert not red.any() and not blue.any() and green.sum() > 1000


def test_inspect_reads_a_16_bit_png_as_a_picture_not_white(inspected):
    shown = np.asarray(_norm_map_figures(inspected)[0].axes[0].images[0].get_array())
    assert shown[:, :4].max() < 20 and shown[:, -4:].min() > 230  # dark to bright, as the file holds


def test_histograms_draw_the_threshold_line(inspected):
    (fig,) = [f for f in inspected.figures if f.get_suptitle().startswith("token norms")]
    layers = [ax for ax in fig.axes if ax.axison]
    assert len(layers) == 12
    for ax in layers:
        lines = [line for line in ax.get_lines() if line.get_label() == "threshold 123"]
        assert len(lines) == 1 and list(lines[0].get_xdata()) == [123, 123]
    assert "threshold 123" in [t.get_text() for t in layers[0].get_legend().get_texts()]


def test_attention_panels_have_a_colour_bar_per_prefix_query(inspected):
    fig = [f for f in inspected.figures if f.get_suptitle().startswith("last-layer attention")][0]
    panels = np.array([ax.images[0] for ax in fig.axes if ax.images], dtype=object).reshape(5, 6)  # CLS+4 reg, heads
    for row in panels:
        bars = [im.colorbar for im in row if im.colorbar is not None]
        assert len(bars) == 1  # one bar per row, on one shared scale
        top = max(float(np.max(im.get_array())) for im in row)
        assert all(im.get_clim() == (0.0, pytest.approx(top)) for im in row)


def test_progress_bar_counts_skipped_files_and_stops_at_max_images(inspected):
    assert "skipping" in inspected.out and "broken.jpg" in inspected.out
    assert "2 images inspected" in inspected.out and "extra" not in inspected.out
    assert "3/3" in inspected.err.split("\r")[-1]  # deep, wide and the broken file: the bar ends full


@pytest.mark.parametrize("value", ["0", "-2"])
def test_max_images_must_be_positive(tmp_path, image_dir, capsys, value):
    assert cli.main(["inspect", str(image_dir), "--max-images", value]) == 2
    assert capsys.readouterr().err.strip() == f"regkern inspect: error: --max-images: expected >= 1, got {value}"


# -------------------------------------------------------------------------- image modes


def _gradient16(height: int = 8, width: int = 32) -> np.ndarray:
    return (np.arange(height * width, dtype=np.uint32).reshape(height, width) * 257).astype(np.uint16)


def _mode_file(tmp_path, mode: str):
    """A file PIL writes in ``mode`` (and reads back in it), and the RGB picture to_rgb must make of it."""
    from PIL import Image

    g16 = _gradient16()
    if mode == "I;16":
        image, suffix, gray = Image.fromarray(g16), "png", g16 >> 8
    elif mode == "I;16B":
        image, suffix, gray = Image.fromarray(g16.astype(">u2")), "tif", g16 >> 8
    elif mode == "I16":  # older Pillow opens 16-bit PNGs as "I": the same high byte
        image, suffix, gray = Image.fromarray(g16.astype(np.int32)), "tif", g16 >> 8
    elif mode == "I":
        data = g16.astype(np.int32) * 3  # beyond 16 bits: scaled by the image's range
        image, suffix = Image.fromarray(data), "tif"
        gray = np.round(data / data.max() * 255)
    elif mode == "F":
        data = g16.astype(np.float32) / 65535 * 0.5  # floats up to 0.5: the maximum becomes white
        image, suffix = Image.fromarray(data), "tif"
        gray = np.round(data / data.max() * 255)
    path = tmp_path / f"image.{suffix}"
    image.save(path)
    return path, np.repeat(gray.astype(np.uint8)[..., None], 3, axis=-1)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I16", "I", "F"])
def test_to_rgb_scales_16_bit_integer_and_float_images(tmp_path, mode):
    from PIL import Image

    path, expected = _mode_file(tmp_path, mode)
    with Image.open(path) as im:
        assert im.mode == ("I" if mode == "I16" else mode)  # the file really holds this mode
        rgb = to_rgb(im)
    assert rgb.mode == "RGB"
    got = np.asarray(rgb).astype(int)
    assert np.abs(got - expected.astype(int)).max() <= 1
    assert got.min() == 0 and got.max() >= 250  # a gradient, not a white picture


def test_to_rgb_composites_palette_transparency_over_white(tmp_path):
    from PIL import Image

    palette = Image.new("P", (4, 2))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 red (made transparent), index 1 green
    palette.putdata([0, 0, 0, 0, 1, 1, 1, 1])
    palette.save(tmp_path / "palette.png", transparency=0)
    with Image.open(tmp_path / "palette.png") as im:
        assert im.mode == "P" and "transparency" in im.info
        rgb = np.asarray(to_rgb(im))
    assert (rgb[0] == 255).all()  # transparent: white, not the red under it
    assert (rgb[1] == [0, 255, 0]).all()


def test_to_rgb_composites_palette_alpha_over_white():
    from PIL import Image

    # PIL writes no file format in mode PA, so this one is built in memory
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 255] + [0] * 765)
    pa = palette.convert("PA")
    pa.putalpha(Image.frombytes("L", (2, 1), bytes([0, 255])))
    assert pa.mode == "PA"
    rgb = np.asarray(to_rgb(pa))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 1].tolist() == [0, 0, 255]


def test_inspect_on_differential_attention_writes_norms_and_says_why_there_are_no_attention_maps(
    tmp_path, image_dir, capsys
):
    out_dir = tmp_path / "out"
    argv = ["inspect", str(image_dir), "--model", "vit_dwee_patch16_reg1_gap_256", "--img-size", "32"]
    code = cli.main(argv + ["--max-images", "2", "--out", str(out_dir)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "no attention maps: RegisterDiffAttention cannot report them (differential attention" in captured.out
    names = sorted(p.name for p in out_dir.iterdir())
    assert "norms.json" in names and any(n.startswith("norm_map_") for n in names)
    assert not any(n.startswith("attention_") for n in names)


def test_demo_attention_map_of_differential_attention_is_refused(tmp_path, capsys):
    argv = ["demo", "--model", "vit_dwee_patch16_reg1_gap_256", "--img-size", "32", "--batch-size", "1"]
    assert cli.main(argv + ["--repeats", "1", "--monitor", "--attention-map", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "regkern demo: error: --attention-map: RegisterDiffAttention cannot report attention maps (differential"
    ), err
