"""Outpainting: canvas size, original pixels kept away from the seam, no visible step at the old border."""

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime import masks
from sdrt.runtime.errors import InvalidOption

MASK_BLUR = 4  # generate()'s default (A1111's)
# how far the repainted band reaches into the old image: the feathered overlap, then the blur's kernel radius
SEAM_REACH = masks.OUTPAINT_OVERLAP + int(masks.GAUSS_TRUNCATE * MASK_BLUR + 0.5) + 1


def smooth_image(width=64, height=64):
    """A smooth diagonal colour ramp: any seam step would stand out against its small gradient."""
    x = np.linspace(60, 180, width)[None, :]
    y = np.linspace(40, 200, height)[:, None]
    rgb = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], -1)
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def outpainted(tiny_pipeline):
    image = smooth_image()
    out = tiny_pipeline.outpaint(image, "a landscape", left=16, down=8, steps=4, seed=5, cfg_scale=5, progress=False)
    return image, out[0]


def test_size_and_original_kept_away_from_the_seam(outpainted):
    image, out = outpainted
    assert out.size == (80, 72)
    o, r = np.asarray(image).astype(int), np.asarray(out).astype(int)
    old = r[0:64, 16:80]  # where the original sits on the canvas
    assert np.array_equal(old[: 64 - SEAM_REACH, SEAM_REACH:], o[: 64 - SEAM_REACH, SEAM_REACH:])
    assert "Size: 80x72" in out.info["parameters"] and "Denoising strength: 1" in out.info["parameters"]


def column_steps(pixels):
    """(H, W, 3) -> (W - 1,): the largest per-channel jump between neighbouring columns of the row-averaged image."""
    profile = pixels.astype(float).mean(axis=0)  # (W, 3): averaging over rows cancels the generated texture
    return np.abs(np.diff(profile, axis=0)).max(axis=1)


def test_no_seam_step_at_the_old_border(outpainted):
    """Across the old left border (column 16), the jump is no larger than the generated area's own texture,
    and far smaller than where the generated area is pasted hard against the original (measured: 15 vs 107)."""
    image, out = outpainted
    rows = slice(0, 56)  # away from the bottom seam
    steps = column_steps(np.asarray(out)[rows])
    at_border = steps[14:17].max()  # the steps around column 16, where the old image starts
    assert at_border <= steps[:14].max(), (at_border, steps[:14])
    canvas, _ = masks.outpaint_canvas(image, left=16, down=8, seed=5)
    hard = np.asarray(out).copy()
    hard[:, 16:] = np.asarray(canvas)[:, 16:]  # the same generated area without the feathered overlap
    hard_step = column_steps(hard[rows])[15]
    assert hard_step > 3 * at_border, (hard_step, at_border)


def test_refuses_bad_amounts_and_sizes(tiny_pipeline):
    image = smooth_image()
    with pytest.raises(InvalidOption, match="left/right/up/down"):
        tiny_pipeline.outpaint(image, "x")
    with pytest.raises(InvalidOption, match="right"):
        tiny_pipeline.outpaint(image, "x", right=10)
    with pytest.raises(InvalidOption, match="image.*multiples of 8"):
        tiny_pipeline.outpaint(smooth_image(60, 64), "x", left=8)
    with pytest.raises(InvalidOption, match="width.*72"):
        tiny_pipeline.outpaint(image, "x", left=8, width=64)


@pytest.fixture(scope="module")
def tiny_inpaint_pipeline(tiny_inpaint):
    """The tiny 9-channel inpainting model (conftest's tiny_inpaint), loaded."""
    return tiny_inpaint[1]


def test_inpainting_model_outpaints(tiny_inpaint_pipeline):
    image = smooth_image()
    out = tiny_inpaint_pipeline.outpaint(image, "sky", right=8, up=16, steps=3, seed=2, progress=False)[0]
    assert out.size == (72, 80)
    o, r = np.asarray(image).astype(int), np.asarray(out).astype(int)
    old = r[16:80, 0:64]
    assert np.array_equal(old[SEAM_REACH:, : 64 - SEAM_REACH], o[SEAM_REACH:, : 64 - SEAM_REACH])
    canvas, _ = masks.outpaint_canvas(image, right=8, up=16, seed=2)
    assert np.abs(r[:8] - np.asarray(canvas)[:8].astype(int)).mean() > 4  # the new rows were painted, not prefilled
