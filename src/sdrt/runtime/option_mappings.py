"""How A1111's request fields and infotext values map onto GenerationOptions (the `a1111=` and `read=` of each
option's Spec in options.py)."""

from sdrt.errors import InvalidOption
from sdrt.runtime.image import format_number

RNG_NAMES = {"CPU": "torch", "GPU": "gpu", "NV": "nv"}  # A1111's labels (infotext "RNG", option randn_source)
UNSET = object()  # an A1111 mapping's answer when the request does not carry the option


def if_masked(request, value):
    """An inpainting option of an A1111 request: only with a mask (outpaint requests always have one)."""
    return value if getattr(request, "mask", True) is not None else UNSET


def a1111_mask_blur(request):
    if getattr(request, "mask", True) is None:
        return UNSET
    if getattr(request, "mask_blur", None) is None and request.mask_blur_x != request.mask_blur_y:
        raise InvalidOption("mask_blur_y", request.mask_blur_y, f"{request.mask_blur_x}, equal to mask_blur_x")
    return request.mask_blur_x if request.mask_blur is None else request.mask_blur


def a1111_mask_invert(request):
    if request.inpainting_mask_invert not in (0, 1):
        raise InvalidOption("inpainting_mask_invert", request.inpainting_mask_invert, "0 or 1")
    return if_masked(request, bool(request.inpainting_mask_invert))


def read_rng(label: str) -> str:
    if label not in RNG_NAMES:
        raise InvalidOption("RNG", label, ", ".join(RNG_NAMES))
    return RNG_NAMES[label]


def infotext_number(value):
    return None if value is None else format_number(value)
