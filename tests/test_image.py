"""Infotext exactly as A1111 writes it, PNG text chunks, atomic writes."""

import numpy as np
from PIL import Image

from sdrt.runtime.image import format_number, infotext, quote, save_png, to_pil


def test_infotext_layout_matches_a1111():
    params = {
        "Steps": 20,
        "Sampler": "Euler a",
        "Schedule type": "Automatic",
        "CFG scale": "7",
        "Seed": 1,
        "Face restoration": None,
        "Size": "512x512",
        "Model hash": "6ce0161689",
        "Model": "v1-5-pruned",
    }
    text = infotext("a cat", "blurry, ugly", params)
    assert text == (
        "a cat\nNegative prompt: blurry, ugly\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, "
        "CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned"
    )
    assert infotext("a cat", "", {"Steps": 2}) == "a cat\nSteps: 2"  # no negative line when empty


def test_quote_and_numbers_like_a1111():
    assert quote("plain") == "plain"
    assert quote("a, b") == '"a, b"' and quote("k: v") == '"k: v"' and quote('say "x",') == '"say \\"x\\","'
    assert format_number(7.0) == "7" and format_number(7.5) == "7.5"


def test_png_keeps_parameters_and_write_is_atomic(tmp_path):
    image = to_pil(np.zeros((1, 3, 8, 8), dtype=np.float32))[0]
    assert np.asarray(image).max() == 128  # 0 in [-1, 1] -> (0/2 + 0.5) * 255 rounded
    image.info["parameters"] = "a cat\nSteps: 2"
    path = save_png(image, tmp_path / "x.png")
    assert Image.open(path).info["parameters"] == "a cat\nSteps: 2"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
