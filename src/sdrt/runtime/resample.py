"""torch.nn.functional.interpolate's 2-D modes in numpy (align_corners=False), for hires fix's latent upscalers:
bilinear, bicubic (Keys a = -0.75, edge-clamped taps), nearest, nearest-exact, and the antialiased bilinear /
bicubic (PIL-style separable filters, a = -0.5 for cubic, weights normalised at the borders). Each axis is a
(out, in) weight matrix, applied as two matrix products.
"""

import math

import numpy as np

MODES = ("bilinear", "bicubic", "nearest", "nearest-exact")
TORCH_CUBIC_A = -0.75  # torch's upsample_bicubic2d
AA_CUBIC_A = -0.5  # torch's antialiased bicubic (as PIL)


def interpolate(x: np.ndarray, size: tuple[int, int], mode: str, antialias: bool = False) -> np.ndarray:
    """(B, C, H, W) -> (B, C, *SIZE) float32, as torch's F.interpolate(x, size=SIZE, mode=MODE, antialias=...)."""
    if mode not in MODES:
        raise ValueError(f"unknown interpolation mode {mode!r}")
    rows = _weights(x.shape[2], size[0], mode, antialias)  # (out_h, H)
    cols = _weights(x.shape[3], size[1], mode, antialias)  # (out_w, W)
    y = np.einsum("oh,bchw->bcow", rows, x.astype(np.float64))
    return np.einsum("pw,bcow->bcop", cols, y).astype(np.float32)


def _weights(n_in: int, n_out: int, mode: str, antialias: bool) -> np.ndarray:
    scale = n_in / n_out
    w = np.zeros((n_out, n_in), np.float64)
    if antialias and mode in ("bilinear", "bicubic"):
        return _aa_weights(n_in, n_out, mode)
    for i in range(n_out):
        if mode == "nearest":
            w[i, min(math.floor(i * scale), n_in - 1)] = 1
        elif mode == "nearest-exact":
            w[i, min(math.floor((i + 0.5) * scale), n_in - 1)] = 1
        elif mode == "bilinear":
            src = max(scale * (i + 0.5) - 0.5, 0.0)
            i0 = min(int(src), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            frac = src - i0
            w[i, i0] += 1 - frac
            w[i, i1] += frac
        else:  # bicubic: four taps around floor(src), clamped to the edges
            src = scale * (i + 0.5) - 0.5
            i0 = math.floor(src)
            t = src - i0
            for k, coeff in zip(range(-1, 3), _cubic_coeffs(t, TORCH_CUBIC_A), strict=True):
                w[i, min(max(i0 + k, 0), n_in - 1)] += coeff
    return w


def _cubic_coeffs(t: float, a: float) -> tuple[float, float, float, float]:
    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def _aa_weights(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """torch's _upsample_*_aa: a filter of support (1 or 2) * max(scale, 1) centred at scale * (i + 0.5)."""
    scale = n_in / n_out
    support = (1.0 if mode == "bilinear" else 2.0) * max(scale, 1.0)
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        taps = np.array([_aa_filter((j - center + 0.5) * inv, mode) for j in range(lo, hi)])
        total = taps.sum()
        w[i, lo:hi] = taps / total if total != 0 else taps
    return w


def _aa_filter(x: float, mode: str) -> float:
    x = abs(x)
    if mode == "bilinear":
        return max(0.0, 1.0 - x)
    a = AA_CUBIC_A
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0
