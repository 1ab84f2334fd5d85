"""Arrays <-> PIL images, and PNGs carrying A1111's infotext in their "parameters" text chunk."""

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, 3, H, W) float32 in [-1, 1] -> RGB PIL images, rounded as diffusers' numpy_to_pil does."""
    unit = np.clip(images / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)  # (B, H, W, 3)
    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in unit]


def from_pil(image: Image.Image) -> np.ndarray:
    """An RGB PIL image -> (1, 3, H, W) float32 in [-1, 1], as diffusers' VaeImageProcessor normalises it."""
    unit = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)  # (H, W, 3)
    return (unit * 2 - 1).transpose(2, 0, 1)[None].copy()


def quote(value) -> str:
    """A1111's infotext quoting: JSON-quote a value holding a comma, colon or newline."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def format_number(value) -> str:
    """7.0 -> "7", 7.5 -> "7.5": how A1111 prints the numbers its UI hands it."""
    return str(int(value)) if float(value).is_integer() else str(value)


def infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """A1111's infotext: prompt, "Negative prompt: ..." if any, then "Key: value" pairs; None values left out."""
    pairs = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{pairs}".strip()


def save_png(image: Image.Image, path: Path) -> Path:
    """Write IMAGE with its infotext to PATH atomically (a temp file renamed into place)."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
