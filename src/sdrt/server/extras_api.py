"""A1111's upscaler routes over sdrt: POST /sdapi/v1/extra-single-image and /extra-batch-images (the Extras tab's
upscale: upscaling_resize, resize to a size, upscaler_1 blended with upscaler_2), GET /sdapi/v1/upscalers,
/latent-upscale-modes and /realesrgan-models, and the hires fix checks of txt2img requests (the upscaler installed,
the hires size within the server's pixel limit).

Upscalers: A1111's None, Lanczos and Nearest, plus the exported models of `sdrt serve --upscaler-dir`. Extras jobs
run one at a time in the server process, beside (not inside) the generation queue; over Ray in the ingress process,
on its CPU, with the same folder the replicas load for hires fix.
"""

import threading
from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from sdrt.errors import InvalidOption
from sdrt.runtime.hires_options import DEFAULT_UPSCALER, LATENT_MODES, plan
from sdrt.runtime.upscale import UpscalerSet, postprocess_upscale
from sdrt.server.codec import encode_png

EXTRAS_LOCK = threading.Lock()  # one extras job at a time: each uses every core
MAX_BATCH_IMAGES = 64


class ExtrasRequest(BaseModel):
    """A1111's ExtrasBaseRequest (modules/api/models.py): the upscale fields sdrt runs; face restoration refused."""

    resize_mode: int = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasRequest):
    image: str = ""


class FileData(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasRequest):
    imageList: list[FileData] = Field(default_factory=list)  # noqa: N815 (A1111's field name)


def upscalers_of(server) -> UpscalerSet:
    """The upscalers of the server's Pipeline (`--upscaler-dir`), or over Ray the ingress's set of the folder the
    replicas load (ray_app.RayBackend.upscalers)."""
    pipe = server.pipe
    if pipe is not None:
        return pipe.upscalers
    return getattr(server.backend, "upscalers", None) or UpscalerSet()


def check_hires(server, req) -> None:
    """A txt2img request's hires fix, before it queues: its upscaler installed, its size within max_pixels."""
    if not getattr(req, "enable_hr", False):
        return
    name = req.hr_upscaler or DEFAULT_UPSCALER
    if name not in LATENT_MODES:
        upscalers = upscalers_of(server)
        if name not in upscalers.names:
            raise InvalidOption("hr_upscaler", name, ", ".join([*LATENT_MODES, *upscalers.names]))
    width, height = req.width or 512, req.height or 512
    view = SimpleNamespace(width=width, height=height, hires_scale=req.hr_scale, hires_resize_x=req.hr_resize_x,
                           hires_resize_y=req.hr_resize_y, hires_steps=req.hr_second_pass_steps, steps=req.steps,
                           strength=req.denoising_strength or 0.75, hires_upscaler=name)  # fmt: skip
    try:
        size = plan(view, server.manifest.latent_downsample).size
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return  # malformed numbers: resolve names the field
    if size[0] * size[1] > server.limits.max_pixels:
        field = "hr_scale" if not (req.hr_resize_x or req.hr_resize_y) else "hr_resize_x"
        allowed = f"a hires size of at most {server.limits.max_pixels} pixels here (this one: {size[0]}x{size[1]})"
        raise InvalidOption(field, getattr(req, field), allowed)
    if req.hr_second_pass_steps > server.limits.max_steps:
        raise InvalidOption("hr_second_pass_steps", req.hr_second_pass_steps, f"0 to {server.limits.max_steps}")


def _upscale(server, req: ExtrasRequest, image, field: str):
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(req, name):
            raise InvalidOption(name, getattr(req, name), "0: sdrt has no face restoration")
    with EXTRAS_LOCK:
        out, info = postprocess_upscale(
            upscalers_of(server), image, req.upscaler_1, req.resize_mode, req.upscaling_resize,
            req.upscaling_resize_w, req.upscaling_resize_h, req.upscaling_crop, req.upscaler_2,
            req.extras_upscaler_2_visibility, max_pixels=server.limits.max_input_pixels,
        )  # fmt: skip
    return out, ", ".join(f"{k}: {v}" for k, v in info.items())


def add_routes(app: FastAPI, server) -> None:
    @app.get("/sdapi/v1/upscalers")
    def upscalers():
        return [{"name": u.name, "model_name": u.model_name, "model_path": u.model_path, "model_url": None,
                 "scale": u.scale} for u in upscalers_of(server).infos()]  # fmt: skip

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes():
        return [{"name": name} for name in LATENT_MODES]

    @app.get("/sdapi/v1/realesrgan-models")
    def realesrgan_models():
        models = upscalers_of(server).models.values()
        return [{"name": m.name, "path": str(m.folder), "scale": m.scale} for m in models]

    @app.post("/sdapi/v1/extra-single-image")
    async def extra_single_image(req: ExtrasSingleImageRequest):
        def work():
            image = server.decode(req.image, "image")
            out, info = _upscale(server, req, image, "image")
            return {"html_info": info, "image": encode_png(out)}

        return await run_in_threadpool(work)

    @app.post("/sdapi/v1/extra-batch-images")
    async def extra_batch_images(req: ExtrasBatchImagesRequest):
        if not 1 <= len(req.imageList) <= MAX_BATCH_IMAGES:
            raise InvalidOption("imageList", f"{len(req.imageList)} images", f"1 to {MAX_BATCH_IMAGES} images")

        def work():
            images = [server.decode(f.data, f"imageList[{i}].data") for i, f in enumerate(req.imageList)]
            results = [_upscale(server, req, im, f"imageList[{i}]") for i, im in enumerate(images)]
            return {"html_info": results[0][1], "images": [encode_png(out) for out, _ in results]}

        return await run_in_threadpool(work)
