"""A1111's image and mask operations for img2img, inpainting and outpainting, as pure numpy/PIL functions.

No model calls: the pipeline calls these around the VAE and the sampler. Images are PIL images (RGB, or L
for masks, 255 = repaint); arrays are commented with their shapes.
"""

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from sdrt.errors import InvalidOption, is_int

RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")  # A1111's resize_mode 0, 1, 2
INPAINTING_FILLS = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0..3
BACKGROUND = (255, 255, 255)  # A1111's img2img_background_color default: transparency is flattened on white
MASK_THRESHOLD = 128  # A1111's create_binary_mask: a mask value > 128 repaints (mask_round)
MIN_IMAGE_SIDE = 8  # one latent cell: smaller inputs hold nothing the VAE can encode
MAX_IMAGE_SIDE = 16384  # inputs beyond this are refused before decoding (8x the largest output side)
GAUSS_TRUNCATE = 2.5  # A1111's mask blur kernel: 2 * int(2.5 * sigma + 0.5) + 1 taps (cv2.GaussianBlur)
OUTPAINT_MULTIPLE = 8  # outpaint amounts are multiples of the latent downsampling
OUTPAINT_OVERLAP = 16  # the outpaint mask reaches this many pixels into the old image, feathered to 0
OUTPAINT_NOISE_RAMP = 16  # pixels over which the prefill's noise grows from 0 (at the old border) to full
DecompressionBomb = Image.DecompressionBombWarning  # raised as an error: Pillow's pixel limit, not a crash
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))  # A1111 masking.fill: (blur radius, repeats)


def load_image(source, field: str = "init_image", min_side: int = MIN_IMAGE_SIDE, max_side: int = MAX_IMAGE_SIDE):
    """A path or PIL image -> RGB, as A1111's img2img reads it: EXIF orientation applied, transparency on white.

    Conversions (to_rgb): RGBA/LA/PA and palettes with transparency are composited on white (A1111's
    `images.flatten` with its default background); greyscale, 1-bit and CMYK are converted to RGB;
    16-bit and 32-bit greyscale are scaled to 8 bits (A1111 would clip them to 255). Anything that is
    not an image, or a side outside [min_side, max_side], raises InvalidOption(field, ...).
    """
    return to_rgb(open_image(source, field, min_side, max_side))


def open_image(source, field: str, min_side: int = MIN_IMAGE_SIDE, max_side: int = MAX_IMAGE_SIDE) -> Image.Image:
    """A path or PIL image -> a decoded PIL image in its own mode, EXIF-rotated; bad files -> InvalidOption(field)."""
    if isinstance(source, Image.Image):
        image, name = source, f"{source.width}x{source.height} {source.mode} image"
    elif isinstance(source, (str, Path)):
        name = str(source)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", DecompressionBomb)
                image = Image.open(source)
        except (FileNotFoundError, IsADirectoryError):
            raise InvalidOption(field, name, "an existing image file") from None
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, DecompressionBomb):
            raise InvalidOption(field, name, "an image file Pillow can read (PNG, JPEG, WebP, ...)") from None
    else:
        raise InvalidOption(field, type(source).__name__, "a PIL image or the path of an image file")
    width, height = image.size  # from the header: checked before the pixels are decoded
    if min(width, height) < min_side or max(width, height) > max_side:
        raise InvalidOption(field, f"{name} of {width}x{height} pixels", f"sides from {min_side} to {max_side} pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DecompressionBomb)
            image.load()
            return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, DecompressionBomb) as e:
        raise InvalidOption(field, name, f"an image file that decodes completely ({e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: deep greyscale scaled to 8 bits, transparency flattened on white (A1111's flatten)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)  # (H, W)
        top = 255.0 if values.max(initial=0) <= 255 else 65535.0  # 16-bit PNGs open as "I" or "I;16"
        image = Image.fromarray(np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        background.alpha_composite(image)
        image = background
    return image.convert("RGB")


def check_resize_mode(mode: str) -> str:
    """A1111's resize mode names (or their index 0, 1, 2) -> the name; anything else is an InvalidOption."""
    if is_int(mode) and 0 <= mode < len(RESIZE_MODES):
        return RESIZE_MODES[mode]
    if isinstance(mode, str) and mode.strip().lower() in RESIZE_MODES:
        return mode.strip().lower()
    raise InvalidOption("resize_mode", mode, ", ".join(RESIZE_MODES))


def resize_image(image: Image.Image, width: int, height: int, mode: str = "just resize") -> Image.Image:
    """A1111's images.resize_image geometry: stretch, cover-and-centre-crop, or fit-and-stretch-edges (Lanczos)."""
    mode = check_resize_mode(mode)
    if mode == "just resize":
        return image.resize((width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    cover = mode == "crop and resize"
    # cover: the image fills the box and the excess is cropped; fit: it fits inside and the gaps are filled
    wide_box = ratio > src_ratio if cover else ratio >= src_ratio
    if wide_box == cover:
        src_w, src_h = width, image.height * width // image.width
    else:
        src_w, src_h = image.width * height // image.height, height
    resized = image.resize((src_w, src_h), Image.LANCZOS)
    out = Image.new(image.mode, (width, height))
    left, top = width // 2 - src_w // 2, height // 2 - src_h // 2
    out.paste(resized, (left, top))
    if cover:
        return out
    pixels = np.asarray(out).copy()  # (H, W[, C])
    if top > 0:  # A1111 stretches the first and last rows over the gaps above and below
        pixels[:top] = pixels[top]
        pixels[top + src_h :] = pixels[top + src_h - 1]
    if left > 0:  # and the first and last columns over the gaps left and right
        pixels[:, :left] = pixels[:, left : left + 1]
        pixels[:, left + src_w :] = pixels[:, left + src_w - 1 : left + src_w]
    return Image.fromarray(pixels, image.mode)


def load_mask(source, size: tuple[int, int], field: str = "mask") -> tuple[Image.Image, list[str]]:
    """A mask -> (L image of SIZE, 255 = repaint, notes): A1111's create_binary_mask, resized if its size differs.

    An RGBA mask whose alpha is not all opaque uses its alpha channel (A1111: painted strokes are the
    opaque part); any other mode is converted to greyscale. Values > 128 become 255, the rest 0.
    A mask of another size than the init image is stretched to it ("just resize"), and a note says so.
    """
    notes = []
    image = open_image(source, field, min_side=1)
    if image.mode in ("LA", "PA") or image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        grey = image.getchannel("A")
        notes.append(f"{field}: RGBA mask; its alpha channel is used (opaque = repaint)")
    else:
        if image.mode not in ("L", "1"):
            notes.append(f"{field}: {image.mode} mask converted to greyscale")
        grey = to_rgb(image).convert("L") if image.mode.startswith(("I", "F")) else image.convert("L")
    if grey.size != tuple(size):
        notes.append(f"{field}: {grey.width}x{grey.height} mask resized to the image's {size[0]}x{size[1]}")
        grey = grey.resize(tuple(size), Image.LANCZOS)
    return binarize(grey), notes


def binarize(mask: Image.Image) -> Image.Image:
    """A1111's mask_round: values > 128 -> 255, else 0."""
    return mask.point(lambda v: 255 if v > MASK_THRESHOLD else 0)


def invert_mask(mask: Image.Image) -> Image.Image:
    """A1111's inpainting_mask_invert ("Inpaint not masked"): 255 - mask."""
    return ImageOps.invert(mask.convert("L"))


def check_mask_not_empty(mask: Image.Image, field: str = "mask") -> None:
    """An all-black mask repaints nothing: refused (an all-white one is allowed: img2img of the whole image)."""
    if mask.getbbox() is None:
        raise InvalidOption(
            field, "an all-black mask", "a mask with white (repaint) pixels; with inpainting_mask_invert, black ones"
        )


def gaussian_kernel(sigma: float) -> np.ndarray:
    """cv2.getGaussianKernel(2 * int(2.5 * sigma + 0.5) + 1, sigma): the 1-D kernel A1111's mask blur uses."""
    radius = int(GAUSS_TRUNCATE * sigma + 0.5)
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(taps**2) / (2 * sigma * sigma))
    return kernel / kernel.sum()  # (2 * radius + 1,) float64


def blur_mask(mask: Image.Image, blur_x: float, blur_y: float | None = None) -> Image.Image:
    """A1111's mask_blur_x / mask_blur_y: a Gaussian of sigma blur_x along x, then blur_y along y (cv2's edges)."""
    blur_y = blur_x if blur_y is None else blur_y
    values = np.asarray(mask.convert("L"), dtype=np.float64)  # (H, W)
    for axis, sigma in ((1, blur_x), (0, blur_y)):
        if sigma <= 0:
            continue
        kernel = gaussian_kernel(sigma)
        radius = len(kernel) // 2
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(values, pad, mode="reflect" if values.shape[axis] > 1 else "edge")  # cv2's BORDER_REFLECT_101
        values = np.apply_along_axis(lambda line, k=kernel: np.convolve(line, k, mode="valid"), axis, padded)
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")


def overlay_mask(mask: Image.Image) -> Image.Image:
    """A1111's mask_for_overlay outside "only masked": the blurred mask doubled and clipped (a harder edge)."""
    values = np.asarray(mask.convert("L"), dtype=np.float64) * 2  # (H, W)
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")


def latent_mask(mask: Image.Image, latent_width: int, latent_height: int) -> np.ndarray:
    """A1111's latmask: the mask resized (bicubic) to the latent grid and rounded to 0/1 -> (1, 1, h, w) float32."""
    small = mask.convert("L").resize((latent_width, latent_height), Image.BICUBIC)
    return np.round(np.asarray(small, dtype=np.float32) / 255)[None, None]  # (1, 1, h, w): 1 = repaint


def check_inpainting_fill(mode) -> str:
    """A1111's inpainting_fill names (or their index 0..3) -> the name; anything else is an InvalidOption."""
    if is_int(mode) and 0 <= mode < len(INPAINTING_FILLS):
        return INPAINTING_FILLS[mode]
    if isinstance(mode, str) and mode.strip().lower() in INPAINTING_FILLS:
        return mode.strip().lower()
    raise InvalidOption("inpainting_fill", mode, ", ".join(INPAINTING_FILLS))


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's masking.fill ("fill"): the masked area painted with ever less blurred copies of the unmasked colours."""
    keep = ImageOps.invert(mask.convert("L"))
    known = Image.new("RGBa", image.size)  # premultiplied, so blurs do not pull in the masked colours
    known.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    out = Image.new("RGBA", image.size)
    for radius, repeats in FILL_PASSES:
        layer = known.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(layer)
    return out.convert("RGB")


def fill_init_image(image: Image.Image, mask: Image.Image, mode: str) -> Image.Image:
    """The init image before VAE encoding: "fill" repaints the masked area from its surroundings, others keep it."""
    return fill_masked(image, mask) if check_inpainting_fill(mode) == "fill" else image


def fill_init_latents(latents: np.ndarray, mask: np.ndarray, mode: str, noise: np.ndarray | None = None) -> np.ndarray:
    """A1111's latent fills: "latent noise" puts NOISE under the mask, "latent nothing" zeros, others keep the latents.

    latents (B, C, h, w) float32, mask (1 or B, 1, h, w) float32 with 1 = repaint, noise like latents.
    """
    mode = check_inpainting_fill(mode)
    if mode == "latent noise":
        if noise is None:
            raise ValueError("latent noise needs noise")
        return (latents * (1 - mask) + noise * mask).astype(np.float32)
    if mode == "latent nothing":
        return (latents * (1 - mask)).astype(np.float32)
    return latents


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int]:
    """A1111's masking.get_crop_region: the mask's bounding box grown by PADDING, clipped to the image."""
    box = mask.convert("L").getbbox()
    if box is None:
        check_mask_not_empty(mask)
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_crop_region(region, width: int, height: int, image_width: int, image_height: int):
    """A1111's masking.expand_crop_region: grow REGION to the aspect ratio width:height, kept inside the image."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow_span(y1, y2, int((x2 - x1) * height / width - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow_span(x1, x2, int((y2 - y1) * width / height - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow_span(lo: int, hi: int, grow: int, limit: int) -> tuple[int, int]:
    """Widen [lo, hi) by GROW pixels around its centre, shifted back inside [0, limit) and clipped there."""
    lo, hi = lo - grow // 2, hi + grow - grow // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def crop_for_inpaint(image: Image.Image, mask: Image.Image, width: int, height: int, padding: int):
    """A1111's inpaint_full_res: (image crop, mask crop) resized to width x height ("resize and fill"), paste box.

    The paste box is (x, y, w, h) in the original image, for paste_back.
    """
    x1, y1, x2, y2 = expand_crop_region(crop_region(mask, padding), width, height, mask.width, mask.height)
    region = (x1, y1, x2, y2)
    image_crop = resize_image(image.crop(region), width, height, "resize and fill")
    mask_crop = resize_image(mask.convert("L").crop(region), width, height, "resize and fill")
    return image_crop, mask_crop, (x1, y1, x2 - x1, y2 - y1)


def paste_back(generated: Image.Image, original: Image.Image, mask: Image.Image, paste_box=None) -> Image.Image:
    """A1111's apply_overlay: GENERATED where the (blurred) MASK is white, ORIGINAL where it is black, blended between.

    With a paste box (x, y, w, h) from crop_for_inpaint, GENERATED is first fitted to it ("crop and resize");
    outside the box the original stays. Pixels where the mask is 0 are the original's, bit for bit.
    """
    original = original.convert("RGB")
    canvas = np.asarray(original, dtype=np.float64).copy()  # (H, W, 3)
    weight = np.zeros(canvas.shape[:2])  # (H, W): how much of the generated image shows
    if paste_box is None:
        canvas = np.asarray(generated.convert("RGB").resize(original.size, Image.LANCZOS), dtype=np.float64)
        weight[:] = 1.0
    else:
        x, y, w, h = paste_box
        fitted = resize_image(generated.convert("RGB"), w, h, "crop and resize")
        canvas[y : y + h, x : x + w] = np.asarray(fitted, dtype=np.float64)
        weight[y : y + h, x : x + w] = 1.0
    alpha = weight * np.asarray(mask.convert("L"), dtype=np.float64) / 255  # (H, W)
    base = np.asarray(original, dtype=np.float64)
    out = np.round(canvas * alpha[..., None] + base * (1 - alpha[..., None]))
    out = np.where(alpha[..., None] == 0, base, out)  # exact outside the mask
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def check_outpaint_amounts(left: int, right: int, up: int, down: int) -> dict[str, int]:
    """Outpaint amounts: non-negative multiples of 8 pixels, not all zero."""
    amounts = {"left": left, "right": right, "up": up, "down": down}
    for name, value in amounts.items():
        if not is_int(value) or value < 0 or value % OUTPAINT_MULTIPLE:
            raise InvalidOption(name, value, f"a non-negative multiple of {OUTPAINT_MULTIPLE} pixels")
    if not any(amounts.values()):
        raise InvalidOption("left/right/up/down", 0, "at least one direction greater than 0")
    return amounts


def outpaint_canvas(
    image: Image.Image, left: int = 0, right: int = 0, up: int = 0, down: int = 0, seed: int = 0
) -> tuple[Image.Image, Image.Image]:
    """The extended canvas and its mask for outpainting: edges extended plus noise of the image's colour spread.

    The new area is the old edge pixels stretched outwards plus Gaussian noise with each channel's
    standard deviation, growing from 0 at the old border over OUTPAINT_NOISE_RAMP pixels. The mask is
    255 on the new area and falls linearly to 0 over OUTPAINT_OVERLAP pixels inside the old image, so
    the repainted band overlaps the seam; farther in it is 0 and the original is kept.
    """
    check_outpaint_amounts(left, right, up, down)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    height, width = pixels.shape[:2]
    extended = np.pad(pixels, ((up, down), (left, right), (0, 0)), mode="edge")  # (H', W', 3)
    rows = np.arange(extended.shape[0])
    cols = np.arange(extended.shape[1])
    # signed distance outside the old image along each axis (> 0 outside, <= 0 inside), in pixels
    out_y = np.maximum(up - rows, rows - (up + height - 1))  # (H',)
    out_x = np.maximum(left - cols, cols - (left + width - 1))  # (W',)
    outside = np.maximum(out_y[:, None], out_x[None, :])  # (H', W'): Chebyshev distance past the old border
    # the overlap only reaches into the old image from the sides that were extended
    sides = []
    if up:
        sides.append(np.broadcast_to((rows - up)[:, None], outside.shape))
    if down:
        sides.append(np.broadcast_to((up + height - 1 - rows)[:, None], outside.shape))
    if left:
        sides.append(np.broadcast_to((cols - left)[None, :], outside.shape))
    if right:
        sides.append(np.broadcast_to((left + width - 1 - cols)[None, :], outside.shape))
    depth = np.minimum.reduce(sides)  # (H', W'): < 0 in the new area, distance from an extended border inside
    mask = np.where(depth < 0, 1.0, np.clip(1 - (depth + 1) / (OUTPAINT_OVERLAP + 1), 0, 1))
    ramp = np.clip(outside / OUTPAINT_NOISE_RAMP, 0, 1)[..., None]  # (H', W', 1)
    std = pixels.reshape(-1, 3).std(axis=0)  # (3,) the image's colour spread
    noise = np.random.default_rng(seed).standard_normal(extended.shape) * std
    canvas = np.clip(np.round(extended + noise * ramp), 0, 255).astype(np.uint8)
    canvas[up : up + height, left : left + width] = np.asarray(image.convert("RGB"))
    mask_image = Image.fromarray(np.round(mask * 255).astype(np.uint8), "L")
    return Image.fromarray(canvas, "RGB"), mask_image
