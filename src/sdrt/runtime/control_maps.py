"""A ControlNet unit's control map, as A1111's ControlNet extension makes it: the control image read, preprocessed at
the unit's resolution (pixel perfect: the short side the image gets at the generation size), and fitted to the
generation size by the unit's resize mode."""

import numpy as np
from PIL import Image

from sdrt.errors import InvalidOption
from sdrt.runtime.control_preprocess import PREPROCESSORS

MIN_PROCESSOR_RES, MAX_PROCESSOR_RES = 64, 2048


def load_control_image(image, field: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a PIL image, a path or an array; InvalidOption naming FIELD otherwise."""
    from sdrt.runtime import masks

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise InvalidOption(field, f"array {image.dtype} {image.shape}", "an (H, W, 3) uint8 array")
        image = Image.fromarray(image if image.ndim == 2 or image.shape[2] != 1 else image[..., 0])
    pil = masks.load_image(image, field)
    return np.asarray(pil.convert("RGB"))


def pixel_perfect_resolution(raw: tuple[int, int], target: tuple[int, int], resize_mode: str) -> int:
    """The extension's pixel-perfect preprocessor resolution: the image's short side after the resize that maps it
    onto the target (the larger scale for cropping, the smaller for filling). raw, target: (height, width)."""
    k0, k1 = target[0] / raw[0], target[1] / raw[1]
    k = min(k0, k1) if resize_mode == "Resize and Fill" else max(k0, k1)
    return int(round(k * min(raw)))


def resize_short_side(image: np.ndarray, resolution: int) -> np.ndarray:
    """IMAGE scaled so its short side is RESOLUTION (bicubic up, area down: the extension's resize_image_with_pad)."""
    h, w = image.shape[:2]
    k = resolution / min(h, w)
    size = (max(1, int(round(w * k))), max(1, int(round(h * k))))
    if size == (w, h):
        return image
    resample = Image.Resampling.BICUBIC if k > 1 else Image.Resampling.BOX
    return np.asarray(Image.fromarray(image).resize(size, resample))


def fit_map(control_map: np.ndarray, width: int, height: int, resize_mode: str, binary: bool) -> np.ndarray:
    """The control map at the generation size: "Just Resize" stretches, "Crop and Resize" scales to cover and crops
    the centre, "Resize and Fill" scales to fit and fills the border with the map's median edge colour (the
    extension's). Binary maps stay black and white (re-thresholded at 128)."""
    h, w = control_map.shape[:2]
    if (w, h) == (width, height):
        return control_map

    def resized(img, size):
        if img.shape[1::-1] == size:
            return img
        return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))

    if resize_mode == "Just Resize":
        out = resized(control_map, (width, height))
    elif resize_mode == "Crop and Resize":
        k = max(width / w, height / h)
        scaled = resized(control_map, (max(width, int(round(w * k))), max(height, int(round(h * k)))))
        top, left = (scaled.shape[0] - height) // 2, (scaled.shape[1] - width) // 2
        out = scaled[top : top + height, left : left + width]
    else:
        k = min(width / w, height / h)
        scaled = resized(control_map, (min(width, max(1, int(round(w * k)))), min(height, max(1, int(round(h * k))))))
        edges = np.concatenate([control_map[0], control_map[-1], control_map[:, 0], control_map[:, -1]])
        out = np.empty((height, width, 3), np.uint8)
        out[:] = np.median(edges, axis=0).astype(np.uint8)
        top, left = (height - scaled.shape[0]) // 2, (width - scaled.shape[1]) // 2
        out[top : top + scaled.shape[0], left : left + scaled.shape[1]] = scaled
    if binary:
        out = np.where(out >= 128, 255, 0).astype(np.uint8)
    return np.ascontiguousarray(out)


def control_map(unit, width: int, height: int, field: str) -> np.ndarray:
    """UNIT's (a checked controlnet.ControlNetUnit) control map at width x height: (height, width, 3) uint8."""
    image = load_control_image(unit.image, f"{field}.image")
    pre = PREPROCESSORS[unit.module]
    if pre.uses_resolution:
        res = pixel_perfect_resolution(image.shape[:2], (height, width), unit.resize_mode) if unit.pixel_perfect else (
            unit.processor_res)  # fmt: skip
        image = resize_short_side(image, max(MIN_PROCESSOR_RES, res))
    mapped = pre.run(image, unit.threshold_a, unit.threshold_b)
    return fit_map(np.ascontiguousarray(mapped, dtype=np.uint8), width, height, unit.resize_mode, pre.binary)
