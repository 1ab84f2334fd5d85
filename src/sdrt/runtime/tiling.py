"""Tiled VAE decode and encode: overlapping tiles blended with raised-cosine ramps, so no seam shows.

Rule for the overlap (in latent cells): a tile's output is wrong near a tile edge that lies inside the image,
as far in as the network's effective receptive radius R; so each tile's weight is 0 for MARGIN >= R cells
from such an edge, then ramps up smoothly (cos^2) to 1 across the rest of the overlap. Neighbouring ramps
span the same cells and sum to 1, so OVERLAP >= 2 * MARGIN + RAMP. GroupNorm and the VAE's mid-block
attention see the whole input, which no overlap makes exact: larger tiles bring their statistics closer.
"""

import math

import numpy as np

from sdrt.errors import InvalidOption, is_int

DEFAULT_TILE = 64  # latent cells per tile side (512 px for SD): 4x less VAE activation memory than 1024 px
DEFAULT_OVERLAP = 24  # latent cells shared by neighbouring tiles
MIN_TILE = 16  # latent cells (128 px): smaller tiles are mostly overlap
DEFAULT_MARGIN = 8  # latent cells next to a tile's inner edge whose output is discarded (>= effective radius)


def check_tiling(tile: int, overlap: int = DEFAULT_OVERLAP, margin: int = DEFAULT_MARGIN) -> tuple[int, int, int]:
    """(tile, overlap, margin) in latent cells if they make a seamless blend, else InvalidOption."""
    for name, v in (("vae_tile", tile), ("tile_overlap", overlap), ("tile_margin", margin)):
        if not is_int(v) or v < 0:
            raise InvalidOption(name, v, "a non-negative integer (latent cells)")
    if overlap < 2 * margin + 1:
        raise InvalidOption("tile_overlap", overlap, f"at least 2 * margin + 1 = {2 * margin + 1} latent cells")
    if tile < max(2 * overlap, MIN_TILE):
        raise InvalidOption("vae_tile", tile, f"at least {max(2 * overlap, MIN_TILE)} latent cells (2 * overlap)")
    return int(tile), int(overlap), int(margin)


def tiling_for(tile: int) -> tuple[int, int, int]:
    """(tile, overlap, margin) for a tile of TILE latent cells: the default overlap, at most half the tile, and a
    margin of a third of the overlap (a ramp of the other third)."""
    overlap = min(DEFAULT_OVERLAP, tile // 2)
    return check_tiling(tile, overlap, overlap // 3)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of TILE cells covering LENGTH, evenly spaced, neighbours sharing at least OVERLAP cells."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def edge_ramp(size: int, overlap: int, margin: int) -> np.ndarray:
    """(size,) weights by distance from an inner edge: 0 within MARGIN, then cos^2 up to 1 at OVERLAP - MARGIN."""
    d = np.arange(size, dtype=np.float64)
    u = np.clip((d - margin + 0.5) / (overlap - 2 * margin), 0.0, 1.0)
    return (0.5 - 0.5 * np.cos(np.pi * u)) * (d >= margin)


def axis_weights(starts: list[int], tile: int, length: int, scale: int, margin: int) -> list[np.ndarray]:
    """Per tile, (tile * scale,) weights along one axis: ramps only at edges that lie inside the image."""
    weights = []
    for i, s in enumerate(starts):
        size = min(tile, length) * scale
        w = np.ones(size)
        if i > 0:  # the left neighbour shares [s, its end)
            shared = (min(starts[i - 1] + tile, length) - s) * scale
            w *= edge_ramp(size, shared, margin * scale)
        if i < len(starts) - 1:
            shared = (s + tile - starts[i + 1]) * scale
            w *= edge_ramp(size, shared, margin * scale)[::-1]
        weights.append(w)
    return weights


def run_tiled(fn, x: np.ndarray, tile: int, overlap: int, margin: int, in_scale: int, out_scale: int):
    """FN over overlapping tiles of X, outputs blended. Tile sizes are in latent cells; a cell is IN_SCALE input
    and OUT_SCALE output pixels (decode: 1 -> 8, encode: 8 -> 1). FN: (1, C, th, tw) -> {name: (1, C', oh, ow)}."""
    h, w = x.shape[2] // in_scale, x.shape[3] // in_scale  # latent cells
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    wy, wx = axis_weights(rows, tile, h, out_scale, margin), axis_weights(cols, tile, w, out_scale, margin)
    sums, total = {}, np.zeros((h * out_scale, w * out_scale))
    for r, row_w in zip(rows, wy, strict=True):
        for c, col_w in zip(cols, wx, strict=True):
            part = x[:, :, r * in_scale : (r + tile) * in_scale, c * in_scale : (c + tile) * in_scale]
            out = fn(np.ascontiguousarray(part))
            weight = np.outer(row_w, col_w)  # (th * out_scale, tw * out_scale)
            ys = slice(r * out_scale, r * out_scale + weight.shape[0])
            xs = slice(c * out_scale, c * out_scale + weight.shape[1])
            for name, y in out.items():
                acc = sums.setdefault(name, np.zeros((y.shape[0], y.shape[1], *total.shape)))
                acc[:, :, ys, xs] += y * weight
            total[ys, xs] += weight
    return {name: (acc / total).astype(np.float32) for name, acc in sums.items()}


def decode_tiled(vae, latents: np.ndarray, tile: int, overlap: int, margin: int, scale: int = 8) -> np.ndarray:
    """(1, C, h, w) unscaled latents -> (1, 3, h*scale, w*scale) float32 through VAE (an engine) tile by tile."""
    out = run_tiled(lambda z: vae.run({"latent_sample": z}), latents, tile, overlap, margin, 1, scale)
    return out["sample"]


def encode_tiled(vae, images: np.ndarray, tile: int, overlap: int, margin: int, scale: int = 8) -> dict:
    """(1, 3, H, W) image -> {"latent_mean", "latent_logvar"}: (1, C, H/scale, W/scale) float32 each, tile by tile."""
    return run_tiled(lambda x: vae.run({"sample": x}), images, tile, overlap, margin, scale, 1)
