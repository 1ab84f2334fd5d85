"""POST /sdapi/v1/png-info: an image's infotext, A1111's parsed parameters, and its other text chunks."""

from PIL import Image

from sdrt.runtime.infotext import parse_infotext, read_parameters

# A1111's IGNORED_INFO_KEYS: Pillow's format details, not text a user wrote
IGNORED_INFO_KEYS = {
    "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background", "timestamp",
    "duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop", "parameters",
}  # fmt: skip


def png_info_response(image: Image.Image) -> dict:
    """A1111's PNGInfoResponse: {"info": infotext or "", "items": other text chunks, "parameters": parsed}.

    The infotext is the PNG "parameters" chunk, the EXIF UserComment of A1111's JPEG/WebP files, or ComfyUI's
    prompt graph turned into an infotext (infotext.read_parameters).
    """
    info, _ = read_parameters(image)
    items = {k: v for k, v in image.info.items() if k not in IGNORED_INFO_KEYS and isinstance(v, str)}
    return {"info": info or "", "items": items, "parameters": parse_infotext(info) if info else {}}
