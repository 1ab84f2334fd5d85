"""ControlNet preprocessors that need no downloaded model, in numpy (the A1111 ControlNet extension's modules of the
same names, `annotator/` and `scripts/processor.py`): none, canny, invert, threshold, scribble_xdog, tile_resample.

Every preprocessor maps an (H, W, 3) uint8 RGB image to an (H', W', 3) uint8 control map. Canny follows OpenCV's
`cv2.Canny(image, low, high)` (3x3 Sobel, L1 gradient, the colour channel of largest gradient, 8-connected
hysteresis), which the extension calls; the tests compare it with OpenCV's.
"""

from dataclasses import dataclass

import numpy as np

# OpenCV's non-maximum suppression compares |dy| with tan(22.5 deg) |dx| in fixed point (canny.cpp: CANNY_SHIFT, TG22).
CANNY_SHIFT = 15
TG22 = int(0.4142135623730950488016887242097 * (1 << CANNY_SHIFT) + 0.5)


@dataclass(frozen=True)
class Preprocessor:
    """A module: its function(image, threshold_a, threshold_b) and the extension's slider defaults and ranges."""

    run: object
    threshold_a: tuple[float, float, float] | None = None  # (default, min, max); None: the module takes none
    threshold_b: tuple[float, float, float] | None = None
    binary: bool = False  # the map is black and white: resizing keeps it so
    uses_resolution: bool = True  # runs at the preprocessor resolution (processor_res)


def canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """OpenCV's Canny (L1 gradient, aperture 3) on an (H, W, C) uint8 image -> (H, W) uint8 edges of 0 or 255."""
    low, high = (int(np.floor(low)), int(np.floor(high)))
    if low > high:
        low, high = high, low
    img = np.pad(image.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")  # BORDER_REPLICATE
    # 3x3 Sobel: derivative [-1, 0, 1] across, smoothing [1, 2, 1] along
    dx = img[:, 2:] - img[:, :-2]
    dx = dx[:-2] + 2 * dx[1:-1] + dx[2:]  # (H, W, C)
    dy = img[2:] - img[:-2]
    dy = dy[:, :-2] + 2 * dy[:, 1:-1] + dy[:, 2:]
    mag = np.abs(dx) + np.abs(dy)
    best = np.argmax(mag, axis=2)[..., None]  # first channel of largest magnitude, as OpenCV keeps on ties
    dx, dy, mag = (np.take_along_axis(a, best, axis=2)[..., 0] for a in (dx, dy, mag))
    h, w = mag.shape
    padded = np.zeros((h + 2, w + 2), np.int64)  # magnitudes outside the image are 0
    padded[1:-1, 1:-1] = mag

    def at(oy, ox):
        return padded[1 + oy : 1 + oy + h, 1 + ox : 1 + ox + w]

    x = np.abs(dx).astype(np.int64)
    y = np.abs(dy).astype(np.int64) << CANNY_SHIFT
    tg22x = x * TG22
    tg67x = tg22x + (x << (CANNY_SHIFT + 1))
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg67x)
    diagonal = ~horizontal & ~vertical
    s = np.where((dx ^ dy) < 0, -1, 1)
    keep = np.zeros((h, w), bool)
    keep |= horizontal & (mag > at(0, -1)) & (mag >= at(0, 1))
    keep |= vertical & (mag > at(-1, 0)) & (mag >= at(1, 0))
    # diagonal: the previous row at column j - s, the next row at j + s
    prev_minus, prev_plus, next_minus, next_plus = at(-1, 1), at(-1, -1), at(1, -1), at(1, 1)
    diag_prev = np.where(s == 1, prev_plus, prev_minus)
    diag_next = np.where(s == 1, next_plus, next_minus)
    keep |= diagonal & (mag > diag_prev) & (mag > diag_next)
    candidate = keep & (mag > low)
    edges = candidate & (mag > high)
    while True:  # hysteresis: weak candidates 8-connected to an edge become edges
        grown = np.zeros((h + 2, w + 2), bool)
        for oy in range(3):
            for ox in range(3):
                grown[oy : oy + h, ox : ox + w] |= edges
        grown = grown[1:-1, 1:-1] & candidate
        if np.array_equal(grown | edges, edges):
            break
        edges |= grown
    return np.where(edges, 255, 0).astype(np.uint8)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """OpenCV's GaussianBlur(img, (0, 0), sigma) on float32 (H, W, C): kernel size round(8 sigma + 1) | 1,
    BORDER_REFLECT_101, separable."""
    size = int(round(sigma * 8 + 1)) | 1
    r = size // 2
    t = np.arange(-r, r + 1, dtype=np.float64)
    kernel = np.exp(-(t * t) / (2 * sigma * sigma))
    kernel /= kernel.sum()
    out = image.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="reflect")  # numpy's "reflect" is OpenCV's REFLECT_101
        n = out.shape[axis]
        out = sum(kernel[i] * np.take(padded, np.arange(i, i + n), axis=axis) for i in range(size))
    return out.astype(np.float32)


def _gray(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (OpenCV's and Pillow's RGB -> L weights), (H, W) float32."""
    return image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _rgb(channel: np.ndarray) -> np.ndarray:
    return np.repeat(channel[..., None], 3, axis=2)


def run_none(image, a=None, b=None):
    return image


def run_canny(image, a, b):
    return _rgb(canny(image, a, b))


def run_invert(image, a=None, b=None):
    """ "invert (from white bg & black line)": line art on white becomes white lines on black."""
    return 255 - image


def run_threshold(image, a, b=None):
    """Binarise the luma at threshold_a: brighter pixels white."""
    return _rgb(np.where(_gray(image) > a, 255, 0).astype(np.uint8))


def run_scribble_xdog(image, a, b=None):
    """The extension's scribble_xdog: a difference of Gaussians (sigma 0.5 and 5) thresholded at threshold_a."""
    g1 = gaussian_blur(image.astype(np.float32), 0.5)
    g2 = gaussian_blur(image.astype(np.float32), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    return _rgb(np.where(2 * (255 - dog.astype(np.int32)) > a, 255, 0).astype(np.uint8))


def run_tile_resample(image, a, b=None):
    """The extension's tile_resample: down-sample by threshold_a (below 1.1: unchanged), area-averaged."""
    if a < 1.1:
        return image
    from PIL import Image

    h, w = image.shape[:2]
    size = (max(1, int(w / a)), max(1, int(h / a)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


# name -> Preprocessor; the extension's module names (and the aliases its API accepts).
PREPROCESSORS = {
    "none": Preprocessor(run_none, uses_resolution=False),
    "canny": Preprocessor(run_canny, (100, 1, 255), (200, 1, 255), binary=True),
    "invert (from white bg & black line)": Preprocessor(run_invert, uses_resolution=False),
    "threshold": Preprocessor(run_threshold, (127, 0, 255), binary=True),
    "scribble_xdog": Preprocessor(run_scribble_xdog, (32, 1, 64), binary=True),
    "tile_resample": Preprocessor(run_tile_resample, (1.0, 1.0, 8.0), uses_resolution=False),
}
MODULE_ALIASES = {"invert": "invert (from white bg & black line)", "tile": "tile_resample", "scribble": "scribble_xdog"}
