"""Image upscalers, torch-free: exported ESRGAN-family models (`sdrt export-upscaler`) run tile by tile as A1111's
upscale_with_model does (ESRGAN_tile / ESRGAN_tile_overlap: images.split_grid + combine_grid), and A1111's
non-model upscalers None, Lanczos and Nearest. `UpscalerSet.upscale(image, name, scale)` follows A1111's
Upscaler.upscale: the model runs up to 3 times until the image reaches scale x its size (floored to a multiple of
8), then Lanczos takes it to exactly that size.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdrt.engines.capabilities import capabilities
from sdrt.errors import InvalidOption, ModelError, check_int, check_number

UPSCALER_FORMAT = "sdrt-upscaler"
UPSCALER_VERSION = 1
UPSCALER_MANIFEST = "upscaler.json"
UPSCALER_MODEL = "model.onnx"
UPSCALER_INPUT, UPSCALER_OUTPUT = "image", "upscaled"  # (B, C, H, W) float32 in [0, 1] -> (B, C, sH, sW)
DEFAULT_TILE, DEFAULT_TILE_OVERLAP = 192, 8  # A1111's ESRGAN_tile and ESRGAN_tile_overlap defaults
MAX_PASSES = 3  # A1111's Upscaler.upscale runs the model at most 3 times
MAX_SCALE = 8.0  # A1111's extras slider maximum
BUILTIN = ("None", "Lanczos", "Nearest")  # A1111's non-model upscalers, in its list order


@dataclass(frozen=True)
class UpscalerInfo:
    """One entry of GET /sdapi/v1/upscalers."""

    name: str
    model_name: str | None
    model_path: str | None
    scale: float


class UpscalerModel:
    """An exported upscaler folder: its manifest and an engine loaded on first use."""

    def __init__(self, folder: Path, backend: str = "cpu"):
        self.folder = Path(folder)
        try:
            manifest = json.loads((self.folder / UPSCALER_MANIFEST).read_text())
        except (OSError, ValueError) as e:
            problem = f"no readable {UPSCALER_MANIFEST}: {e}"
            raise ModelError(f"{str(folder)!r} is not an exported upscaler ({problem})") from None
        if manifest.get("format") != UPSCALER_FORMAT or manifest.get("version") != UPSCALER_VERSION:
            raise ModelError(f"{str(folder)!r}: {UPSCALER_MANIFEST} is not a version {UPSCALER_VERSION} upscaler")
        self.manifest = manifest
        self.name = str(manifest["name"])
        self.scale = int(manifest["scale"])
        self.multiple = int(manifest.get("size_multiple", 1))
        self.minimum = int(manifest.get("minimum_size", 0))  # spandrel exports: smaller inputs are padded up to it
        self.bgr = manifest.get("channel_order", "BGR") == "BGR"
        self.averaged = manifest.get("tiling", "grid") == "average"  # SwinIR: A1111's tiled_upscale_2
        self.backend = engine_backend(backend)
        self.engine = None

    def run(self, pixels: np.ndarray, clip: bool = True) -> np.ndarray:
        """(H, W, 3) float32 RGB in [0, 1] -> (sH, sW, 3) float32 RGB (in [0, 1] with CLIP) in one call."""
        if self.engine is None:
            from sdrt.engines import create_engine

            self.engine = create_engine(self.folder / UPSCALER_MODEL, self.backend)
            self.engine.load()
        h, w = pixels.shape[:2]
        pad_h, pad_w = (-(-max(side, self.minimum) // self.multiple) * self.multiple - side for side in (h, w))
        x = np.pad(pixels, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect") if pad_h or pad_w else pixels
        x = x[..., ::-1] if self.bgr else x
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)  # (1, 3, H, W)
        y = np.asarray(self.engine.run({UPSCALER_INPUT: x})[UPSCALER_OUTPUT])[0].transpose(1, 2, 0)
        y = y[..., ::-1] if self.bgr else y
        y = y[: h * self.scale, : w * self.scale]
        return (np.clip(y, 0, 1) if clip else y).astype(np.float32)

    def upscale_once(self, image: Image.Image, tile: int, overlap: int, progress=None) -> Image.Image:
        """One pass of the model over IMAGE, in tiles of TILE pixels overlapping by OVERLAP (A1111's
        upscale_with_model; TILE 0: the whole image at once). Output as A1111's: 255 * value, truncated."""
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255  # (H, W, 3)
        if self.averaged:  # A1111's SwinIR upscale: its padding, averaged tiles, rounded output
            out = upscale_averaged(self.run, pixels, self.scale, tile, overlap, self.multiple, progress)
            return Image.fromarray((out * 255).round().astype(np.uint8), "RGB")
        out = upscale_tiled(self.run, pixels, self.scale, tile, overlap, progress)
        return Image.fromarray((out * 255).astype(np.uint8), "RGB")


def engine_backend(backend: str) -> str:
    """The backend an upscaler graph runs on for a pipeline on BACKEND: ONNX Runtime on the backend's device ("cpu",
    "cuda"), OpenVINO as it is (measured 1.3x ONNX Runtime's speed in f32 on RRDBNet), and ONNX Runtime CPU for
    backends that need engines built per graph (TensorRT)."""
    caps = capabilities(backend)
    return caps.fused_target or ("cpu" if caps.device_memory else backend)


def grid_origins(size: int, tile: int, overlap: int) -> list[int]:
    """A1111's images.split_grid along one side: tile origins, evenly spread, the last one flush with the end."""
    count = math.ceil((size - overlap) / (tile - overlap))
    step = (size - tile) / (count - 1) if count > 1 else 0
    return [min(int(i * step), size - tile) for i in range(count)]


def upscale_tiled(run, pixels: np.ndarray, scale: int, tile: int, overlap: int, progress=None) -> np.ndarray:
    """RUN ((h, w, C) -> (h*scale, w*scale, C)) over (H, W, C) PIXELS in A1111's grid, blended as combine_grid does:
    each tile after the first in a row (then each row after the first) fades in over the overlap with A1111's
    linear 8-bit ramp. Tiles are min(TILE, side) pixels; TILE <= 0 or an image within one tile: a single run."""
    h, w = pixels.shape[:2]
    if tile <= 0 or (h <= tile and w <= tile):
        return run(pixels)
    tile_h, tile_w = min(tile, h), min(tile, w)
    overlap = min(overlap, tile_h - 1, tile_w - 1)
    rows, cols = grid_origins(h, tile_h, overlap), grid_origins(w, tile_w, overlap)
    fade = _ramp(overlap * scale)  # (overlap * scale,) alpha of the later tile
    out = None
    for y in rows:
        row = None
        for x in cols:
            result = run(pixels[y : y + tile_h, x : x + tile_w])  # (tile_h * s, tile_w * s, C)
            if row is None:
                row = np.zeros((tile_h * scale, w * scale, result.shape[2]), np.float32)
            _paste(row, result, x * scale, fade, axis=1)
            if progress is not None:
                progress()
        if out is None:
            out = np.zeros((h * scale, w * scale, row.shape[2]), np.float32)
        _paste(out, row, y * scale, fade, axis=0)
    return out


def upscale_averaged(run, pixels: np.ndarray, scale: int, tile: int, overlap: int, window: int, progress=None):
    """A1111's SwinIR upscale: the image mirrored past its bottom and right edges to the next multiple of WINDOW
    beyond its size, tiles of min(TILE, side) every TILE - OVERLAP pixels (the last flush with the edge), their
    outputs averaged where they overlap (tiled_upscale_2), cropped to scale x the size and clipped to [0, 1]."""
    h, w = pixels.shape[:2]
    padded = np.pad(pixels, ((0, (h // window + 1) * window - h), (0, (w // window + 1) * window - w), (0, 0)),
                    mode="symmetric")  # fmt: skip
    ph, pw = padded.shape[:2]
    tile = min(tile, ph, pw)
    if tile <= 0:
        return np.clip(run(padded, clip=False)[: h * scale, : w * scale], 0, 1)
    stride = max(tile - overlap, 1)
    total = np.zeros((ph * scale, pw * scale, pixels.shape[2]), np.float32)
    count = np.zeros((ph * scale, pw * scale, 1), np.float32)
    for y in [*range(0, ph - tile, stride), ph - tile]:
        for x in [*range(0, pw - tile, stride), pw - tile]:
            out = run(padded[y : y + tile, x : x + tile], clip=False)
            total[y * scale : (y + tile) * scale, x * scale : (x + tile) * scale] += out
            count[y * scale : (y + tile) * scale, x * scale : (x + tile) * scale] += 1
            if progress is not None:
                progress()
    return np.clip((total / count)[: h * scale, : w * scale], 0, 1)


def _ramp(overlap: int) -> np.ndarray:
    """combine_grid's mask: r * 255 / overlap as uint8, r = 0 .. overlap - 1, as an alpha in [0, 1)."""
    return (np.arange(overlap, dtype=np.float32) * 255 / max(overlap, 1)).astype(np.uint8).astype(np.float32) / 255


def _paste(canvas: np.ndarray, part: np.ndarray, at: int, fade: np.ndarray, axis: int) -> None:
    """PART into CANVAS at offset AT along AXIS; unless AT is 0, its first len(FADE) lines blend in by FADE."""
    n = part.shape[axis]
    index = [slice(None)] * 3
    index[axis] = slice(at, at + n)
    if at == 0 or len(fade) == 0:
        canvas[tuple(index)] = part
        return
    k = len(fade)
    alpha = fade.reshape((-1, 1, 1) if axis == 0 else (1, -1, 1))
    head = [slice(None)] * 3
    head[axis] = slice(at, at + k)
    part_head = [slice(None)] * 3
    part_head[axis] = slice(0, k)
    tail, part_tail = list(head), list(part_head)
    tail[axis], part_tail[axis] = slice(at + k, at + n), slice(k, n)
    canvas[tuple(head)] = part[tuple(part_head)] * alpha + canvas[tuple(head)] * (1 - alpha)
    canvas[tuple(tail)] = part[tuple(part_tail)]


class UpscalerSet:
    """The upscalers a pipeline or server offers: A1111's built-in ones and exported models (a folder of them)."""

    def __init__(self, backend: str = "cpu", tile: int = DEFAULT_TILE, overlap: int = DEFAULT_TILE_OVERLAP):
        self.backend, self.tile, self.overlap = backend, tile, overlap
        self.models: dict[str, UpscalerModel] = {}

    def load_dir(self, folder) -> None:
        """Every exported upscaler in FOLDER (itself one, or its subfolders), by name; a bad one is an error."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InvalidOption("upscaler_dir", str(folder), "an existing folder of exported upscalers")
        candidates = [folder] if (folder / UPSCALER_MANIFEST).is_file() else sorted(folder.iterdir())
        for sub in candidates:
            if (sub / UPSCALER_MANIFEST).is_file():
                self.add(UpscalerModel(sub, self.backend))

    def add(self, model: UpscalerModel) -> None:
        if model.name in BUILTIN or model.name in self.models:
            raise ModelError(f"two upscalers are named {model.name!r} ({model.folder}); rename one's folder")
        self.models[model.name] = model

    @property
    def names(self) -> list[str]:
        return [*BUILTIN, *self.models]

    def infos(self) -> list[UpscalerInfo]:
        """A1111's /sdapi/v1/upscalers entries (Lanczos and Nearest have scale 4, None 4 as in A1111)."""
        builtin = [UpscalerInfo(name, None, None, 4) for name in BUILTIN]
        models = [
            UpscalerInfo(m.name, m.manifest.get("architecture"), str(m.folder), m.scale) for m in self.models.values()
        ]
        return builtin + models

    def check(self, field: str, name) -> str:
        """NAME if it is an installed upscaler; else InvalidOption naming FIELD and listing the installed ones."""
        if not isinstance(name, str) or name not in self.names:
            raise InvalidOption(field, name, ", ".join(self.names))
        return name

    def upscale(self, image: Image.Image, name: str, scale: float, progress=None) -> Image.Image:
        """A1111's Upscaler.upscale: to (size * SCALE) // 8 * 8 pixels with upscaler NAME."""
        dest_w, dest_h = int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8)
        for i in range(MAX_PASSES):
            if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
                break
            size = image.size
            image = self._once(image, name, scale, progress)
            if image.size == size:
                break
        if image.size != (dest_w, dest_h):
            image = image.resize((dest_w, dest_h), resample=Image.LANCZOS)
        return image

    def _once(self, image: Image.Image, name: str, scale: float, progress) -> Image.Image:
        if name == "None":
            return image
        if name in ("Lanczos", "Nearest"):
            size = (int(image.width * scale), int(image.height * scale))
            return image.resize(size, resample=Image.LANCZOS if name == "Lanczos" else Image.NEAREST)
        return self.models[name].upscale_once(image, self.tile, self.overlap, progress)

    def resize(self, image: Image.Image, width: int, height: int, name: str | None) -> Image.Image:
        """A1111's images.resize_image mode 0 ("Just resize") with an upscaler: upscale when growing, then Lanczos."""
        if name is None or name == "None" or image.mode == "L":
            return image.resize((width, height), resample=Image.LANCZOS)
        scale = max(width / image.width, height / image.height)
        if scale > 1.0:
            image = self.upscale(image, name, scale)
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.LANCZOS)
        return image


def check_scale(field: str, value) -> float:
    """An upscale factor: a number above 0 and at most MAX_SCALE."""
    value = check_number(field, value, 0, MAX_SCALE)
    if value <= 0:
        raise InvalidOption(field, value, f"above 0, at most {MAX_SCALE}")
    return float(value)


def postprocess_upscale(upscalers: UpscalerSet, image: Image.Image, upscaler_1: str, resize_mode: int = 0,
                        upscale_by: float = 2.0, width: int = 512, height: int = 512, crop: bool = True,
                        upscaler_2: str = "None", visibility_2: float = 0.0, max_pixels=None):  # fmt: skip
    """A1111's extras upscale (scripts/postprocessing_upscale.py): by a factor (RESIZE_MODE 0) or to WIDTH x HEIGHT
    (1: the factor that covers both, then a centred crop when CROP), with UPSCALER_1, blended with UPSCALER_2's
    result at VISIBILITY_2. (image, infotext entries); MAX_PIXELS bounds the output."""
    upscalers.check("upscaler_1", upscaler_1)
    upscalers.check("upscaler_2", upscaler_2)
    if resize_mode not in (0, 1):
        raise InvalidOption("resize_mode", resize_mode, "0 (scale by upscaling_resize) or 1 (to a width and height)")
    info = {}
    if resize_mode == 1:
        for field, size in (("upscaling_resize_w", width), ("upscaling_resize_h", height)):
            check_int(field, size, 1, 1 << 15)
        scale = max(width / image.width, height / image.height)
        info["Postprocess upscale to"] = f"{width}x{height}"
    else:
        scale = check_scale("upscaling_resize", upscale_by)
        info["Postprocess upscale by"] = format_scale(scale)
    out_w, out_h = (int(image.width * scale), int(image.height * scale))
    if resize_mode == 1 and crop:
        out_w, out_h = width, height
    if max_pixels is not None and out_w * out_h > max_pixels:
        field = "upscaling_resize" if resize_mode == 0 else "upscaling_resize_w"
        raise InvalidOption(field, f"an output of {out_w}x{out_h}", f"at most {max_pixels} pixels on this server")
    if upscaler_1 == "None":
        return image, {}
    image = image.convert("RGB")
    result = upscalers.upscale(image, upscaler_1, scale)
    info["Postprocess upscaler"] = upscaler_1
    if upscaler_2 != "None" and visibility_2 > 0:
        second = upscalers.upscale(image, upscaler_2, scale)
        result = Image.blend(result, second.resize(result.size), float(min(visibility_2, 1.0)))
        info["Postprocess upscaler 2"] = upscaler_2
    if resize_mode == 1 and crop:
        canvas = Image.new("RGB", (width, height))
        canvas.paste(result, (width // 2 - result.width // 2, height // 2 - result.height // 2))
        result = canvas
        info["Postprocess crop to"] = f"{width}x{height}"
    return result, info


def format_scale(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
