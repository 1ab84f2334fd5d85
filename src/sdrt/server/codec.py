"""Images over HTTP: base64 text -> PIL image (only data, never paths or URLs), PIL image -> base64 PNG."""

import base64
import binascii
import io
import warnings

from PIL import Image, PngImagePlugin, UnidentifiedImageError

DATA_URL_PREFIX = "data:"  # "data:image/png;base64,...." as browsers' FileReader writes it


class UndecodableImage(ValueError):
    """A client's image field that is not a base64-encoded image file (HTTP 400)."""

    def __init__(self, field: str, reason: str):
        self.field = field
        super().__init__(f"{field}: {reason}; allowed: a base64-encoded PNG, JPEG or WebP file (no paths or URLs)")


class ImageTooLarge(ValueError):
    """An image whose header announces more pixels than the server allows (HTTP 422)."""

    def __init__(self, field: str, width: int, height: int, limit: int):
        self.field, self.value = field, f"{width}x{height}"
        super().__init__(f"{field}: got a {width}x{height} image; allowed: at most {limit} pixels")


def decode_image(text, field: str, max_pixels: int) -> Image.Image:
    """A base64 string (optionally a data: URL) -> a fully decoded PIL image; anything else raises."""
    if not isinstance(text, str) or not text.strip():
        raise UndecodableImage(field, "empty or not a string")
    text = text.strip()
    if text.startswith(DATA_URL_PREFIX):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UndecodableImage(field, "not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:  # from the header, before decoding the pixels
                raise ImageTooLarge(field, image.width, image.height, max_pixels)
            image.load()
    except ImageTooLarge:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError, Warning):
        raise UndecodableImage(field, "not an image file that decodes completely") from None
    return image


def encode_png(image: Image.Image) -> str:
    """IMAGE as base64 PNG text, its infotext in the "parameters" chunk (as A1111's API sends images)."""
    info = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
