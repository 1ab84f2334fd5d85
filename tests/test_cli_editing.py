"""CLI for img2img, inpainting and outpainting: bad input is one line naming the field, exit 2, nothing written."""

import numpy as np
import pytest
from PIL import Image

from sdrt.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def files(tmp_path):
    """An RGB init image (64x64), a mask with a white square, a text file that is not an image."""
    rng = np.random.default_rng(0)
    image = tmp_path / "init.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    mask = tmp_path / "mask.png"
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (16, 16, 48, 48))
    m.save(mask)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    return {"image": image, "mask": mask, "text": text, "missing": tmp_path / "missing.png"}


def assert_bad_input(code, err, out_dir, *expected):
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    assert not out_dir.exists()  # nothing written, not even the folder


BAD_EDITING = [
    (["--init-image", "{text}"], "init_image", "image file"),
    (["--init-image", "{missing}"], "init_image", "existing image file"),
    (["--init-image", "{image}", "--mask", "{text}"], "mask", "image file"),
    (["--mask", "{mask}"], "mask", "--init-image"),
    (["--strength", "0.5"], "strength", "--init-image"),
    (["--resize-mode", "crop and resize"], "resize_mode", "--init-image"),
    (["--init-image", "{image}", "--mask-blur", "4"], "mask_blur", "--mask"),
    (["--init-image", "{image}", "--inpaint-full-res"], "inpaint_full_res", "--mask"),
]


@pytest.mark.parametrize(
    ("extra", "field", "allowed"), BAD_EDITING, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD_EDITING)]
)
def test_bad_editing_input(tiny_sd, files, tmp_path, capsys, extra, field, allowed):
    argv = [a.format(**files) for a in extra]
    code, _, err = run_cli(capsys, "generate", "a cat", "-m", tiny_sd[1], "-o", tmp_path / "out", *argv)
    assert_bad_input(code, err, tmp_path / "out", field, allowed)


@pytest.mark.parametrize(
    ("amounts", "field", "allowed"),
    [
        ([], "left/right/up/down", "greater than 0"),
        (["--left", "12"], "left", "multiple of 8"),
        (["--down", "-8"], "down", "multiple of 8"),
    ],
)
def test_bad_outpaint_amounts(tiny_sd, files, tmp_path, capsys, amounts, field, allowed):
    argv = ["outpaint", files["image"], "a cat", "-m", tiny_sd[1], "-o", tmp_path / "out", *amounts]
    code, _, err = run_cli(capsys, *argv)
    assert_bad_input(code, err, tmp_path / "out", field, allowed)


def test_outpaint_not_an_image(tiny_sd, files, tmp_path, capsys):
    argv = ["outpaint", files["text"], "a cat", "-m", tiny_sd[1], "-o", tmp_path / "out", "--left", "8"]
    code, _, err = run_cli(capsys, *argv)
    assert_bad_input(code, err, tmp_path / "out", "image:", "image file")


def test_strength_out_of_range(tiny_sd, files, tmp_path, capsys):
    argv = ["--init-image", files["image"], "--strength", "1.5"]
    code, _, err = run_cli(capsys, "generate", "a cat", "-m", tiny_sd[1], "-o", tmp_path / "out", *argv)
    assert_bad_input(code, err, tmp_path / "out", "strength", "1.5")


def test_bad_mode_names(tiny_sd, files, tmp_path, capsys):
    argv = ["--init-image", files["image"], "--mask", files["mask"], "--inpainting-fill", "blur"]
    code, _, err = run_cli(capsys, "generate", "a cat", "-m", tiny_sd[1], "-o", tmp_path / "out", *argv)
    assert_bad_input(code, err, tmp_path / "out", "inpainting_fill", "latent nothing")
    argv = ["--init-image", files["image"], "--resize-mode", "stretch"]
    code, _, err = run_cli(capsys, "generate", "a cat", "-m", tiny_sd[1], "-o", tmp_path / "out", *argv)
    assert_bad_input(code, err, tmp_path / "out", "resize_mode", "resize and fill")


def test_img2img_and_inpaint_write_pngs(tiny_sd, files, tmp_path, capsys):
    common = ["generate", "a cat", "-m", tiny_sd[1], "--steps", 4, "--seed", 3, "-o", tmp_path / "out"]
    code, out, err = run_cli(capsys, *common, "--init-image", files["image"], "--strength", 0.5)
    assert code == 0, err
    image = Image.open(out.split()[0])
    assert image.size == (64, 64) and "Denoising strength: 0.5" in image.info["parameters"]
    argv = ["--init-image", files["image"], "--mask", files["mask"], "--mask-blur", 2, "--inpainting-fill", "fill"]
    code, out, err = run_cli(capsys, *common, *argv, "--inpaint-full-res", "--inpaint-full-res-padding", 8)
    assert code == 0, err
    result = Image.open(out.split()[0])
    assert "Mask blur: 2" in result.info["parameters"]
    kept = np.asarray(Image.open(files["mask"])) == 0
    kept[8:56, 8:56] = False  # the blurred square's edge
    assert np.array_equal(np.asarray(result)[kept], np.asarray(Image.open(files["image"]))[kept])


def test_outpaint_writes_a_larger_png(tiny_sd, files, tmp_path, capsys):
    argv = ["outpaint", files["image"], "a cat", "-m", tiny_sd[1], "--steps", 3, "--right", 16, "--up", 8]
    code, out, err = run_cli(capsys, *argv, "--seed", 1, "-o", tmp_path / "out")
    assert code == 0, err
    assert Image.open(out.split()[0]).size == (80, 72)


def test_mask_of_another_size_is_resized_and_said_so(tiny_sd, files, tmp_path, capsys):
    small = tmp_path / "small_mask.png"
    Image.open(files["mask"]).resize((32, 32)).convert("RGBA").save(small)  # another size, and RGBA
    argv = ["--init-image", files["image"], "--mask", small, "--steps", 2, "--seed", 1]
    code, out, err = run_cli(capsys, "generate", "a cat", "-m", tiny_sd[1], "-o", tmp_path / "out", *argv)
    assert code == 0, err
    assert "sdrt generate: note: mask: 32x32 mask resized to the image's 64x64" in err and "Traceback" not in err
    assert Image.open(out.split()[0]).size == (64, 64)
