"""masks.py: A1111's image and mask operations (resize modes, blur, crop regions, paste-back, outpaint canvas)."""

import io

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime import masks
from sdrt.runtime.errors import InvalidOption


def gradient(width, height):
    """An RGB test image whose pixel (x, y) tells where it came from: R = x, G = y (scaled), B = 100."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 100)], -1).round().astype(np.uint8), "RGB")


def mask_box(size, box):
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


# ---------------------------------------------------------------- load_image: odd inputs -> RGB or a clear error


def test_rgba_flattened_on_white():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 8, 16))
    rgba.paste((0, 0, 0, 128), (8, 0, 16, 16))
    out = np.asarray(masks.load_image(rgba))
    assert out[0, 0].tolist() == [0, 0, 255]  # opaque stays
    assert out[0, 12].tolist() == [127, 127, 127]  # half black over white
    assert masks.load_image(Image.new("RGBA", (8, 8), (9, 9, 9, 0))).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "P", "LA", "I", "F"])
def test_other_modes_become_rgb(mode):
    image = gradient(16, 12).convert(mode)
    out = masks.load_image(image)
    assert out.mode == "RGB" and out.size == (16, 12)


def test_sixteen_bit_scaled_to_eight(tmp_path):
    values = np.array([[0, 257 * 128, 65535, 65535]] * 8, dtype=np.uint16)  # (8, 4) -> make it 8x8
    values = np.concatenate([values, values], 1)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)  # a 16-bit greyscale PNG
    out = np.asarray(masks.load_image(path))
    assert out[0, :4, 0].tolist() == [0, 128, 255, 255]  # scaled, not clipped to white


def test_exif_orientation_applied(tmp_path):
    image = gradient(24, 8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    assert masks.load_image(path).size == (8, 24)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(InvalidOption, match="init_image.*image file"):
        masks.load_image(path)
    with pytest.raises(InvalidOption, match="mask.*existing"):
        masks.load_image(tmp_path / "missing.png", field="mask")
    with pytest.raises(InvalidOption, match="init_image"):
        masks.load_image(42)


def test_truncated_file(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[:2000])
    with pytest.raises(InvalidOption, match="init_image"):
        masks.load_image(path)


def test_tiny_and_huge_refused(tmp_path, monkeypatch):
    with pytest.raises(InvalidOption, match="sides from 8"):
        masks.load_image(Image.new("RGB", (4, 64)))
    with pytest.raises(InvalidOption, match="to 100 pixels"):
        masks.load_image(Image.new("RGB", (101, 64)), max_side=100)
    # Pillow's decompression-bomb limit is a clear error, not a crash or a warning
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InvalidOption, match="init_image"):
        masks.load_image(path)


# ---------------------------------------------------------------- resize modes: A1111's geometry


def test_just_resize_stretches():
    out = masks.resize_image(gradient(40, 20), 32, 32, "just resize")
    assert out.size == (32, 32)


def test_crop_and_resize_covers_and_centres():
    image = gradient(80, 40)  # 2:1 into 1:1: scaled to 64x32... no: to height 32 -> 64x32, centre 32 columns kept
    out = np.asarray(masks.resize_image(image, 32, 32, "crop and resize")).astype(int)
    full = np.asarray(image.resize((64, 32), Image.LANCZOS)).astype(int)
    assert np.array_equal(out, full[:, 16:48])
    tall = np.asarray(masks.resize_image(gradient(20, 60), 32, 32, 1)).astype(int)
    assert np.array_equal(tall, np.asarray(gradient(20, 60).resize((32, 96), Image.LANCZOS)).astype(int)[32:64])


def test_resize_and_fill_fits_and_stretches_edges():
    image = gradient(80, 40)  # fits as 32x16, centred at rows 8..24; rows above/below repeat the edge rows
    out = np.asarray(masks.resize_image(image, 32, 32, "resize and fill")).astype(int)
    inner = np.asarray(image.resize((32, 16), Image.LANCZOS)).astype(int)
    assert np.array_equal(out[8:24], inner)
    assert (out[:8] == inner[0]).all() and (out[24:] == inner[-1]).all()
    tall = np.asarray(masks.resize_image(gradient(20, 80), 32, 32, 2)).astype(int)
    inner = np.asarray(gradient(20, 80).resize((8, 32), Image.LANCZOS)).astype(int)
    assert np.array_equal(tall[:, 12:20], inner)
    assert (tall[:, :12] == inner[:, :1]).all() and (tall[:, 20:] == inner[:, -1:]).all()


def test_resize_mode_names():
    assert masks.check_resize_mode("Crop and resize") == "crop and resize"
    with pytest.raises(InvalidOption, match="resize_mode.*just resize"):
        masks.check_resize_mode("stretch")
    with pytest.raises(InvalidOption):
        masks.check_resize_mode(3)


# ---------------------------------------------------------------- masks


def test_mask_blur_matches_cv2_gaussian():
    """Separable Gaussian, sigma = mask_blur, 2*int(2.5*sigma+0.5)+1 taps, reflect-101 edges (scipy "mirror")."""
    from scipy import ndimage  # a test dependency (pyproject's "test" extra)

    mask = mask_box((40, 30), (10, 5, 25, 20))
    for bx, by in [(4, 4), (3, 0), (0, 6), (1.5, 2.5)]:
        ours = np.asarray(masks.blur_mask(mask, bx, by)).astype(int)
        ref = np.asarray(mask, dtype=np.float64)
        if bx:
            ref = ndimage.gaussian_filter1d(ref, bx, axis=1, mode="mirror", truncate=2.5)
        if by:
            ref = ndimage.gaussian_filter1d(ref, by, axis=0, mode="mirror", truncate=2.5)
        assert np.abs(ours - np.round(ref)).max() <= 1, (bx, by)
    assert len(masks.gaussian_kernel(4)) == 2 * int(2.5 * 4 + 0.5) + 1
    assert masks.blur_mask(mask, 0).tobytes() == mask.tobytes()
    assert masks.blur_mask(mask_box((4, 4), (0, 0, 2, 2)), 8).size == (4, 4)  # kernel wider than the image


def test_invert_and_binarize():
    mask = Image.fromarray(np.array([[0, 128, 129, 255]] * 4, dtype=np.uint8), "L")
    assert np.asarray(masks.binarize(mask))[0].tolist() == [0, 0, 255, 255]
    assert np.asarray(masks.invert_mask(mask))[0].tolist() == [255, 127, 126, 0]


def test_load_mask_conversions():
    colour = Image.new("RGB", (16, 16), (0, 0, 0))
    colour.paste((255, 0, 0), (0, 0, 8, 16))  # red: luma 76 -> black
    colour.paste((255, 255, 255), (8, 0, 16, 16))
    mask, notes = masks.load_mask(colour, (16, 16))
    assert mask.mode == "L" and np.asarray(mask)[0, [0, 12]].tolist() == [0, 255]
    assert any("greyscale" in n for n in notes)
    painted = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # A1111 editor strokes: opaque = repaint
    painted.paste((10, 10, 10, 255), (4, 4, 8, 8))
    mask, notes = masks.load_mask(painted, (16, 16))
    assert np.asarray(mask).sum() == 16 * 255 and any("alpha" in n for n in notes)
    opaque = Image.new("RGBA", (16, 16), (255, 255, 255, 255))
    assert np.asarray(masks.load_mask(opaque, (16, 16))[0]).min() == 255  # opaque alpha: its grey is used
    mask, notes = masks.load_mask(Image.new("L", (8, 8), 255), (32, 16))
    assert mask.size == (32, 16) and any("resized" in n for n in notes)


def test_empty_mask_refused_white_allowed(tmp_path):
    with pytest.raises(InvalidOption, match="mask.*all-black"):
        masks.check_mask_not_empty(Image.new("L", (8, 8), 0))
    masks.check_mask_not_empty(Image.new("L", (8, 8), 255))
    with pytest.raises(InvalidOption, match="mask.*all-black"):
        masks.check_mask_not_empty(masks.invert_mask(Image.new("L", (8, 8), 255)))
    (tmp_path / "m.txt").write_text("no")
    with pytest.raises(InvalidOption, match="mask"):
        masks.load_mask(tmp_path / "m.txt", (8, 8))


def test_overlay_and_latent_masks():
    mask = Image.fromarray(np.array([[0, 60, 128, 200]] * 4, dtype=np.uint8), "L")
    assert np.asarray(masks.overlay_mask(mask))[0].tolist() == [0, 120, 255, 255]
    latent = masks.latent_mask(mask_box((64, 32), (0, 0, 32, 32)), 8, 4)
    assert latent.shape == (1, 1, 4, 8) and set(np.unique(latent)) == {0.0, 1.0}
    assert latent[0, 0, :, :4].min() == 1 and latent[0, 0, :, 4:].max() == 0


def test_inpainting_fills():
    image = gradient(32, 32)
    mask = mask_box((32, 32), (8, 8, 24, 24))
    filled = np.asarray(masks.fill_init_image(image, mask, "fill")).astype(int)
    original = np.asarray(image).astype(int)
    outside = np.asarray(mask) == 0
    assert np.abs(filled[outside] - original[outside]).max() <= 1  # unmasked colours kept (premultiply rounding)
    assert np.abs(filled[16, 16] - original[16, 16]).max() > 0  # the hole is repainted from around it
    assert masks.fill_init_image(image, mask, "original") is image
    latents = np.ones((2, 4, 4, 4), np.float32)
    m = masks.latent_mask(mask, 4, 4)
    noise = np.full_like(latents, 7.0)
    assert np.array_equal(masks.fill_init_latents(latents, m, "latent noise", noise)[0, 0], np.where(m[0, 0], 7, 1))
    assert np.array_equal(masks.fill_init_latents(latents, m, "latent nothing")[1, 2], 1 - m[0, 0])
    assert masks.fill_init_latents(latents, m, "fill") is latents
    assert masks.check_inpainting_fill(2) == "latent noise"
    with pytest.raises(InvalidOption, match="inpainting_fill.*latent nothing"):
        masks.check_inpainting_fill("blur")


# ---------------------------------------------------------------- only masked: crop region and paste-back


def test_crop_region_padding_and_clipping():
    mask = mask_box((100, 80), (40, 30, 50, 45))
    assert masks.crop_region(mask, 0) == (40, 30, 50, 45)
    assert masks.crop_region(mask, 10) == (30, 20, 60, 55)
    assert masks.crop_region(mask, 60) == (0, 0, 100, 80)
    with pytest.raises(InvalidOption, match="all-black"):
        masks.crop_region(Image.new("L", (8, 8)), 4)


def test_expand_crop_region_to_aspect():
    # 10 wide x 20 tall into a 1:1 processing size: widened by 10 around its centre
    assert masks.expand_crop_region((40, 30, 50, 50), 64, 64, 100, 80) == (35, 30, 55, 50)
    # 40 wide x 10 tall into 1:1 near the bottom edge: shifted up to stay inside
    assert masks.expand_crop_region((10, 65, 50, 75), 64, 64, 100, 80) == (10, 40, 50, 80)
    # near the left edge
    assert masks.expand_crop_region((0, 10, 4, 50), 64, 64, 100, 80) == (0, 10, 40, 50)
    x1, y1, x2, y2 = masks.expand_crop_region((20, 20, 30, 30), 96, 64, 100, 80)
    assert (x2 - x1) / (y2 - y1) == pytest.approx(1.5, abs=0.1)


def test_crop_for_inpaint_and_paste_back_keeps_outside_exactly():
    original = gradient(96, 80)
    mask = masks.blur_mask(mask_box((96, 80), (40, 30, 56, 46)), 3)
    image_crop, mask_crop, box = masks.crop_for_inpaint(original, mask, 64, 64, 8)
    assert image_crop.size == mask_crop.size == (64, 64)
    x, y, w, h = box
    assert w == h and x >= 0 and y >= 0 and x + w <= 96 and y + h <= 80
    generated = Image.new("RGB", (64, 64), (255, 0, 255))
    out = np.asarray(masks.paste_back(generated, original, mask, box)).astype(int)
    base = np.asarray(original).astype(int)
    m = np.asarray(mask)
    assert np.array_equal(out[m == 0], base[m == 0])  # bit for bit outside the blurred mask
    assert out[m == 255].tolist() == [[255, 0, 255]] * int((m == 255).sum())
    partial = (m > 0) & (m < 255)
    assert partial.any() and (out[partial] != base[partial]).any()
    # whole-image paste (not "only masked")
    out = np.asarray(masks.paste_back(Image.new("RGB", (96, 80), (0, 0, 0)), original, mask)).astype(int)
    assert np.array_equal(out[m == 0], base[m == 0]) and (out[m == 255] == 0).all()


# ---------------------------------------------------------------- outpainting canvas


def test_outpaint_canvas_size_mask_and_prefill():
    image = gradient(64, 48)
    canvas, mask = masks.outpaint_canvas(image, left=8, right=16, up=0, down=8, seed=3)
    assert canvas.size == mask.size == (88, 56)
    c, m, o = np.asarray(canvas).astype(int), np.asarray(mask).astype(int), np.asarray(image).astype(int)
    overlap = masks.OUTPAINT_OVERLAP
    assert np.array_equal(c[0:48, 8:72], o)  # the original sits untouched on the canvas
    assert (m[:, :8] == 255).all() and (m[:, 72:] == 255).all() and (m[48:] == 255).all()
    assert (m[: 48 - overlap, 8 + overlap : 72 - overlap] == 0).all()  # kept away from the seam
    assert (m[0, 8 : 8 + overlap] > 0).all() and m[0, 8 + overlap] == 0  # the mask overlaps the old border ...
    assert (np.diff(m[5, 7 : 9 + overlap]) < 0).all()  # ... falling steadily, no step
    assert m[0, 40] == 0  # no overlap on the side that was not extended (up = 0)
    # prefill: edge extension next to the border, noise of the image's spread farther out
    assert np.abs(c[5, 7] - o[5, 0]).max() <= 16
    far = c[0:48, 72 + masks.OUTPAINT_NOISE_RAMP - 4 :]
    assert (far.std(axis=(0, 1)) >= 0.3 * o.std(axis=(0, 1))).all() and (far[..., 2] == 100).all()  # B is flat
    again, _ = masks.outpaint_canvas(image, left=8, right=16, up=0, down=8, seed=3)
    assert again.tobytes() == canvas.tobytes()


@pytest.mark.parametrize(
    ("amounts", "field"),
    [({"left": 4}, "left"), ({"up": -8}, "up"), ({"down": 8.0}, "down"), ({}, "left/right/up/down")],
)
def test_outpaint_amounts_refused(amounts, field):
    with pytest.raises(InvalidOption, match=field):
        masks.outpaint_canvas(gradient(16, 16), **amounts)
