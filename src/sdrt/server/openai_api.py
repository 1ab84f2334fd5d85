"""An OpenAI-style images API beside A1111's (as stable-diffusion.cpp's and LocalAI's servers offer):
POST /v1/images/generations (JSON) and /v1/images/edits (multipart: image, optional mask -> inpainting), over the
same Server: the same auth, limits, queue and models (`model` = a title of /sdapi/v1/sd-models, or omitted: the
current model).

OpenAI's fields: prompt, n (1-10), size ("WxH" or "auto": the model's native size, also when omitted),
response_format ("b64_json", the default here; "url" gives data: URLs, there being no file store), model. Any other
A1111 request field (negative_prompt, steps, cfg_scale, seed, sampler_name, denoising_strength, ...) may be added
(the OpenAI client's extra_body); OpenAI's own image options (quality, style, background, ...) change nothing here.
Errors are OpenAI's shape: HTTP 400 {"error": {"message", "type", "param", "code"}}; a full queue is 429.
"""

import base64
import io
import re
import time

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from sdrt.errors import InvalidOption, SdrtError
from sdrt.server import a1111
from sdrt.server.codec import ImageTooLarge, UndecodableImage

MAX_N = 10  # OpenAI's limit on n
RESPONSE_FORMATS = ("b64_json", "url")
# A1111 request fields -> the OpenAI field a client set (for error messages)
OPENAI_FIELDS = {"batch_size": "n", "width": "size", "height": "size", "init_images": "image",
                 "init_images[0]": "image", "override_settings.sd_model_checkpoint": "model"}  # fmt: skip
ERRORS = {
    400: {"description": "an invalid request field (OpenAI's error shape, naming it in `param`)"},
    413: {"description": "request body too large"},
    429: {"description": "the queue is full; Retry-After says when to retry"},
}


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations (OpenAI's CreateImageRequest; extra A1111 fields are passed on)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(max_length=32000)
    n: int = 1
    size: str | None = None
    response_format: str | None = None
    model: str | None = None
    stream: bool | None = None


class OpenAIError(Exception):
    def __init__(self, message: str, param: str | None):
        self.message, self.param = message, param


def openai_error(e: OpenAIError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": "invalid_request_error", "param": e.param, "code": None}}
    return JSONResponse(body, status_code=400)


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """(width, height) of OpenAI's "WxH" ("auto" or None: the model's native size)."""
    if size in (None, "", "auto"):
        return None, None
    match = re.fullmatch(r"\s*(\d{1,5})\s*x\s*(\d{1,5})\s*", str(size))
    if match is None:
        raise InvalidOption("size", size, '"WIDTHxHEIGHT" in pixels (multiples of 8), or "auto"')
    return int(match.group(1)), int(match.group(2))


def a1111_fields(fields: dict, prompt: str, n, size, model) -> dict:
    """The A1111 request fields of an OpenAI request's FIELDS (its extra A1111 fields kept)."""
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise InvalidOption("n", n, f"an integer from 1 to {MAX_N}")
    width, height = parse_size(size)
    out = {**fields, "prompt": prompt, "batch_size": n, "n_iter": 1}
    if model not in (None, ""):
        out["override_settings"] = {**(fields.get("override_settings") or {}), "sd_model_checkpoint": model}
    out.pop("width", None), out.pop("height", None)
    if width is not None:
        out["width"], out["height"] = width, height
    return out


def check_format(response_format: str | None) -> str:
    fmt = response_format or "b64_json"
    if fmt not in RESPONSE_FORMATS:
        raise InvalidOption("response_format", response_format, " or ".join(RESPONSE_FORMATS))
    return fmt


def images_response(body: dict, fmt: str) -> dict:
    """OpenAI's ImagesResponse from an A1111 response BODY."""
    key = "b64_json" if fmt == "b64_json" else "url"
    prefix = "" if fmt == "b64_json" else "data:image/png;base64,"
    data = [{key: prefix + image, "revised_prompt": None} for image in body["images"]]
    return {"created": int(time.time()), "data": data, "output_format": "png"}


async def run_openai(server, kind: str, req, request: Request, fmt: str):
    """Run REQ through the Server; errors as OpenAI's (naming the OpenAI field)."""
    try:
        result = await server.run(kind, req, request)
    except InvalidOption as e:
        field = OPENAI_FIELDS.get(a1111.request_field(e.field), a1111.request_field(e.field))
        raise OpenAIError(f"{field}: got {e.value!r}; allowed: {e.allowed}", field) from None
    except (ImageTooLarge, UndecodableImage) as e:
        raise OpenAIError(str(e), OPENAI_FIELDS.get(e.field, e.field)) from None
    except SdrtError as e:
        raise OpenAIError(str(e), None) from None
    return result if not isinstance(result, dict) else images_response(result, fmt)


def build(model_class, fields: dict):
    """An A1111 request model of FIELDS, its validation errors as OpenAIError naming the field."""
    from pydantic import ValidationError

    try:
        return model_class(**fields)
    except ValidationError as e:
        error = e.errors()[0]
        field = ".".join(str(p) for p in error["loc"])
        raise OpenAIError(f"{field}: {error['msg']}", OPENAI_FIELDS.get(field, field)) from None


def edit_mask(data: bytes, field: str, server) -> str | None:
    """OpenAI's mask (or the image itself): transparent pixels (alpha 0) are the area to edit -> A1111's mask
    (white = repaint) as base64 PNG; None if the image has no transparency. A mask without an alpha channel is
    read as A1111's (white = repaint)."""
    image = server.decode(base64.b64encode(data).decode(), field)
    if image.mode == "P" and "transparency" in image.info or image.mode in ("RGBA", "LA", "PA"):
        alpha = image.convert("RGBA").getchannel("A")
        if field == "image" and alpha.getextrema()[0] == 255:
            return None  # an opaque image: no edit area of its own
        mask = alpha.point(lambda a: 255 if a == 0 else 0)
    elif field == "image":
        return None
    else:
        mask = image.convert("L")
    return png_base64(mask)


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def edit_fields(form, server) -> tuple[dict, str]:
    """The A1111 img2img fields of an /v1/images/edits form, and its response format."""
    upload = form.get("image") or form.get("image[]")
    if upload is None or isinstance(upload, str):
        raise InvalidOption("image", None, "the image to edit, as a file upload (PNG)")
    image_bytes = await upload.read()
    mask_upload = form.get("mask")
    mask = None
    if mask_upload is not None and not isinstance(mask_upload, str):
        mask = edit_mask(await mask_upload.read(), "mask", server)
    else:
        mask = edit_mask(image_bytes, "image", server)
    init = server.decode(base64.b64encode(image_bytes).decode(), "image")
    skip = {"image", "image[]", "mask", "prompt", "n", "size", "response_format", "model", "stream"}
    extras = {k: form.get(k) for k in form if k not in skip}
    n = int(form.get("n", 1)) if str(form.get("n", 1)).strip().isdigit() else form.get("n")
    fields = a1111_fields(extras, form.get("prompt") or "", n, form.get("size"), form.get("model"))
    fields.setdefault("width", init.width // 8 * 8)
    fields.setdefault("height", init.height // 8 * 8)
    fields["init_images"] = [png_base64(init.convert("RGB"))]
    if mask is not None:
        fields.update(mask=mask, inpainting_fill=1)
        fields.setdefault("denoising_strength", 1.0)  # the masked area is made anew, as OpenAI's edits do
    return fields, check_format(form.get("response_format"))


def add_routes(app, server) -> None:
    @app.post("/v1/images/generations", responses=ERRORS, tags=["openai"])
    async def generations(req: ImageGenerationRequest, request: Request):
        """Text to image: OpenAI's images.generate."""
        try:
            if req.stream:
                raise OpenAIError("stream: not supported; images come in one response", "stream")
            fmt = check_format(req.response_format)
            fields = a1111_fields(dict(req.model_extra or {}), req.prompt, req.n, req.size, req.model)
            a1111_req = build(a1111.Txt2ImgRequest, fields)
            if "width" not in fields:
                a1111_req.width = a1111_req.height = None  # the model's native size
            return await run_openai(server, "txt2img", a1111_req, request, fmt)
        except InvalidOption as e:
            return openai_error(OpenAIError(str(e), e.field))
        except OpenAIError as e:
            return openai_error(e)

    @app.post("/v1/images/edits", responses=ERRORS, tags=["openai"])
    async def edits(request: Request):
        """Image + optional mask (transparent = edit) -> inpainting (no transparency: img2img): images.edit.
        multipart/form-data: image, mask, prompt, n, size, response_format, model, and A1111 fields."""
        try:
            try:
                form = await request.form()
            except Exception as e:  # not multipart, or a malformed body
                raise OpenAIError(f"a multipart/form-data body with `image` and `prompt` ({e})", "image") from None
            fields, fmt = await edit_fields(form, server)
            return await run_openai(server, "img2img", build(a1111.Img2ImgRequest, fields), request, fmt)
        except (InvalidOption, ImageTooLarge) as e:
            return openai_error(OpenAIError(str(e), OPENAI_FIELDS.get(e.field, e.field)))
        except UndecodableImage as e:
            return openai_error(OpenAIError(str(e), e.field))
        except OpenAIError as e:
            return openai_error(e)
