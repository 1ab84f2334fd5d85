"""A1111's inpainting options end to end on the tiny model: only-masked, fills, blur, invert, paste-back."""

import numpy as np
import pytest
from PIL import Image

SIZE = 64


def gradient_image() -> Image.Image:
    """A smooth RGB gradient (64x64)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


def square_mask(top=16, left=24, size=16) -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[top : top + size, left : left + size] = 255
    return Image.fromarray(mask)


def run(pipeline, **kw):
    kw = dict(init_image=gradient_image(), mask=square_mask(), steps=6, seed=3, progress=False) | kw
    return np.asarray(pipeline.generate("a cat", **kw)[0], dtype=np.int16)


@pytest.mark.parametrize("full_res", [False, True], ids=["whole-picture", "only-masked"])
def test_pixels_away_from_the_mask_are_the_original(tiny_pipeline, full_res):
    got = run(tiny_pipeline, inpaint_full_res=full_res, inpaint_full_res_padding=8, mask_blur=2)
    original = np.asarray(gradient_image(), dtype=np.int16)
    assert got.shape == original.shape
    far = np.ones((SIZE, SIZE), dtype=bool)
    far[8:40, 16:48] = False  # the 16 px square plus twice the blur's reach
    assert np.abs(got - original)[far].max() == 0
    assert np.abs(got - original)[20:28, 28:36].max() > 8  # the masked area was repainted


def test_only_masked_differs_from_whole_picture(tiny_pipeline):
    whole = run(tiny_pipeline, mask_blur=0)
    only = run(tiny_pipeline, mask_blur=0, inpaint_full_res=True, inpaint_full_res_padding=4)
    assert np.abs(whole - only)[16:32, 24:40].max() > 8


def test_fill_modes_start_from_different_content(tiny_pipeline):
    outs = {fill: run(tiny_pipeline, inpainting_fill=fill, strength=0.6, mask_blur=0)
            for fill in ("fill", "original", "latent noise", "latent nothing")}
    fills = list(outs)
    for i, a in enumerate(fills):
        for b in fills[i + 1:]:
            assert np.abs(outs[a] - outs[b])[16:32, 24:40].max() > 4, (a, b)


def test_inverted_mask_repaints_the_outside(tiny_pipeline):
    got = run(tiny_pipeline, inpainting_mask_invert=True, mask_blur=0)
    original = np.asarray(gradient_image(), dtype=np.int16)
    assert np.abs(got - original)[16:32, 24:40].max() == 0  # the (inverted-away) square is kept
    assert np.abs(got - original)[48:, :].max() > 8
