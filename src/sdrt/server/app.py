"""The FastAPI app: A1111's /sdapi/v1 routes, /sdrt/v1/outpaint, the page at /, request limits and basic auth."""

import asyncio
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from sdrt.errors import InvalidOption, SdrtError
from sdrt.runtime import masks
from sdrt.runtime.controlnet_models import ControlNetCache
from sdrt.server import a1111, controlnet_api, extra_routes, extras_api, model_routes, openai_api, safe_json
from sdrt.server.a1111_settings import A1111_DEFAULTS
from sdrt.server.codec import ImageTooLarge, UndecodableImage, decode_image, encode_png
from sdrt.server.extra_routes import Extras
from sdrt.server.family_form import add_routes as add_family_form_routes
from sdrt.server.generation import Generation, LocalBackend
from sdrt.server.jobs import QueueFull, Unavailable
from sdrt.server.middleware import BasicAuth, BodyLimit
from sdrt.server.models import ModelRegistry, ModelsFolder
from sdrt.server.pnginfo import png_info_response
from sdrt.server.safe_json import field_error
from sdrt.server.vaes import vae_of_options
from sdrt.version import __version__

STATIC = Path(__file__).parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
CLIENT_CLOSED = 499  # nginx's "client closed request": the status logged for an answer nobody reads
log = logging.getLogger("sdrt.server")
# Declared in the OpenAPI schema of the generation routes, besides 200 and FastAPI's 422.
GENERATION_ERRORS = {
    400: {"description": "an image field that is not a base64-encoded image"},
    413: {"description": "request body too large"},
    429: {"description": "the queue is full; Retry-After says when to retry"},
    503: {"description": "the job was lost with the replica that ran it (Ray); Retry-After says when to retry"},
}


@dataclass(frozen=True)
class Limits:
    """Per-request limits (HTTP 422 naming the field, 413 for the body) and the queue's size (429 when full)."""

    max_pixels: int = 2048 * 2048  # width * height of one generated image
    max_steps: int = 150  # A1111's UI slider maximum
    max_batch_size: int = 8  # A1111's UI slider maximum
    max_images: int = 64  # batch_size * n_iter
    max_input_pixels: int = 4096 * 4096  # decoded init images, masks, PNG Info images
    max_body_bytes: int = 64 * 2**20
    max_queue: int = 8  # jobs waiting behind the running one


class Server:
    """The A1111 options and request handling over a generation backend (generation.py: this process or Ray)."""

    def __init__(self, backend, limits: Limits):
        self.backend, self.limits = backend, limits
        self.models = getattr(backend, "models", None) or ModelRegistry.single(backend.manifest)  # models.py
        default = self.models.default()
        title = default.title if default else ""
        self.options = {**A1111_DEFAULTS, **a1111.DEFAULT_OPTIONS, "sd_model_checkpoint": title}  # GET /options

    def checkpoint_title(self, value, field: str) -> str:
        """The title of the model VALUE names (InvalidOption naming FIELD, listing the titles, if none)."""
        return self.models.find(value, field).title

    @property
    def manifest(self):
        """The current model's Manifest (the one sd_model_checkpoint names)."""
        return self.models.manifest(self.models.find(self.options["sd_model_checkpoint"], "sd_model_checkpoint"))

    @property
    def pipe(self):
        """The Pipeline of this process (sdrt serve), or None when replicas hold it (sdrt serve --ray)."""
        return getattr(self.backend, "pipe", None)

    def lora_listing(self) -> list[dict]:
        """GET /sdapi/v1/loras: this process's Pipeline's LoRAs, or over Ray the folder the replicas load."""
        if self.pipe is not None:
            return self.pipe.loras.listing()
        folder = getattr(self.backend, "lora_dir", None)
        if folder is None:
            return []
        from sdrt.runtime.lora import Loras

        return Loras(self.manifest, {}).load_dir(folder).listing()

    def preview_every(self, settings: dict | None = None) -> int:
        settings = self.options if settings is None else settings  # the request's override_settings applied
        return settings["show_progress_every_n_steps"] if settings["live_previews_enable"] else 0

    def check_limits(self, req) -> None:
        lim = self.limits
        if req.steps > lim.max_steps:
            raise InvalidOption("steps", req.steps, f"1 to {lim.max_steps} on this server")
        if req.batch_size > lim.max_batch_size:
            raise InvalidOption("batch_size", req.batch_size, f"1 to {lim.max_batch_size} on this server")
        if req.batch_size * req.n_iter > lim.max_images:
            raise InvalidOption("n_iter", req.n_iter, f"batch_size * n_iter <= {lim.max_images} on this server")
        if req.width is not None and req.height is not None and req.width * req.height > lim.max_pixels:
            raise InvalidOption("width", req.width, f"width * height <= {lim.max_pixels} pixels on this server")
        extras_api.check_hires(self, req)  # hires fix: its upscaler installed, its size within max_pixels

    def prepare(self, kind: str, req) -> tuple[Generation, dict]:
        """Validate REQ completely: (its Pipeline call, what the response needs); errors here answer the request
        before it queues."""
        a1111.apply_infotext(req, self.options)
        req.prompt, req.negative_prompt = self.extras.styles.apply(req.prompt, req.negative_prompt, req.styles)
        controlnet_units = controlnet_api.take_units(req)  # the ControlNet extension's alwayson script
        a1111.check_supported(req)
        self.check_limits(req)
        opts = a1111.settings(req, self.options, self.checkpoint_title)
        entry = self.models.find(opts["sd_model_checkpoint"], "override_settings.sd_model_checkpoint")
        manifest = self.models.manifest(entry)  # exported first if it is a checkpoint (a second request waits)
        kwargs = a1111.generate_kwargs(req, opts)
        kwargs["vae_file"] = vae_of_options(self, opts, req, manifest)  # sd_vae: exported on first use
        a1111.family_defaults(req, kwargs, manifest)  # FLUX.1: its steps and CFG 1 where the request has none
        generation = Generation(kind, kwargs, req.n_iter, self.preview_every(opts), opts["show_progress_type"],
                                model=entry)  # fmt: skip
        if req.force_task_id:
            generation.task_id = req.force_task_id
        if kind == "img2img":
            self.add_img2img(req, kwargs)
        if kind == "outpaint":
            generation.image, generation.amounts = self.add_outpaint(req, kwargs, manifest)
        controlnet_api.add_units(controlnet_units, kwargs, self, manifest)
        model_routes.add_refiner(self, req, kwargs)  # SDXL's refiner_checkpoint: a model of the same registry
        # validates (an outpaint as the img2img of its image); pins seeds and names into kwargs
        inputs = {"init_image": generation.image} if kind == "outpaint" else {}
        resolved = a1111.resolve_request(manifest, kwargs, inputs)
        inpaint_unet = manifest.unet_in_channels != manifest.latent_channels  # A1111: hybrid conditioning
        meta = {"opts": resolved, "clip_skip": opts["CLIP_stop_at_last_layers"], "inpainting": inpaint_unet}
        if req.override_settings and not req.override_settings_restore_afterwards:  # A1111: the overrides stay
            self.options.update({key: opts[key] for key in req.override_settings})
        return generation, dict(meta, manifest=manifest, styles=req.styles)

    def add_img2img(self, req, kwargs: dict) -> None:
        """init_images[0] and the mask, decoded (the other img2img fields come through the options schema)."""
        if not req.init_images or len(req.init_images) != 1:
            count = 0 if not req.init_images else len(req.init_images)
            raise InvalidOption("init_images", f"{count} images", "exactly one base64 image")
        kwargs["init_image"] = self.decode(req.init_images[0], "init_images[0]")
        if req.mask is not None:
            kwargs["mask"] = self.decode(req.mask, "mask")

    def add_outpaint(self, req, kwargs: dict, manifest):
        """(image, amounts) of an outpaint request; the canvas size and editing options into KWARGS."""
        image = self.decode(req.image, "image")
        amounts = masks.check_outpaint_amounts(req.left, req.right, req.up, req.down)
        step = manifest.latent_downsample
        if image.width % step or image.height % step:
            raise InvalidOption("image", f"{image.width}x{image.height}", f"sides that are multiples of {step}")
        kwargs["width"] = req.width or image.width + amounts["left"] + amounts["right"]
        kwargs["height"] = req.height or image.height + amounts["up"] + amounts["down"]
        return image, amounts

    def decode(self, text, field: str):
        return decode_image(text, field, self.limits.max_input_pixels)

    def respond(self, meta: dict, req, images) -> dict:
        """A1111's TextToImageResponse / ImageToImageResponse."""
        parameters = req.model_dump()
        for name in ("init_images", "mask", "image"):
            if name in parameters and not getattr(req, "include_init_images", False):
                parameters[name] = None
        return {
            "images": [encode_png(im) for im in images] if req.send_images else [],
            "parameters": parameters,
            "info": a1111.info_json(images, **meta),
        }

    async def run(self, kind: str, req, request: Request):
        """Queue REQ's job and answer when it is done; a client that leaves first frees its place in the queue."""
        generation, meta = await run_in_threadpool(self.prepare, kind, req)
        future = self.backend.submit(generation)
        while not future.done():
            await asyncio.wait([future], timeout=DISCONNECT_POLL_S)
            if not future.done() and await request.is_disconnected():
                future.cancel()  # a job still waiting is skipped; a running one finishes, unheard
                return Response(status_code=CLIENT_CLOSED)
        return await run_in_threadpool(self.respond, meta, req, future.result())


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InvalidOption)
    async def invalid_option(_, e: InvalidOption):
        field = a1111.request_field(e.field)
        return field_error(field, f"{field}: got {e.value!r}; allowed: {e.allowed}", e.value)

    @app.exception_handler(ImageTooLarge)
    async def too_large(_, e: ImageTooLarge):
        return field_error(e.field, str(e), e.value)

    @app.exception_handler(UndecodableImage)
    async def undecodable(_, e: UndecodableImage):
        return JSONResponse({"detail": str(e)}, status_code=400)

    @app.exception_handler(SdrtError)
    async def sdrt_error(_, e: SdrtError):
        return JSONResponse({"detail": str(e)}, status_code=422)

    @app.exception_handler(QueueFull)
    async def queue_full(_, e: QueueFull):
        return JSONResponse({"detail": str(e)}, status_code=429, headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(Unavailable)
    async def unavailable(_, e: Unavailable):
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(Exception)
    async def unexpected(_, e: Exception):
        log.exception("request failed")
        return JSONResponse({"detail": f"internal error: {safe_json.describe(e)}"}, status_code=500)


def create_app(
    pipe=None, limits: Limits | None = None, credentials: dict[str, str] | None = None, backend=None,
    extras: Extras | None = None,
) -> FastAPI:  # fmt: skip
    """The ASGI app over a loaded Pipeline, or over a generation BACKEND (generation.py); CREDENTIALS
    {user: password} turn on HTTP basic auth for every route; EXTRAS: embeddings, styles, flags (extra_routes.py)."""
    limits = limits or Limits()
    server = Server(backend or LocalBackend(pipe, limits.max_queue), limits)
    server.extras = extras = extras or Extras()
    app = FastAPI(title="sdrt", version=__version__, description="A1111-compatible API over sdrt's runtime")
    app.state.server = server
    install_error_handlers(app)
    safe_json.install(app)  # before the routes: their bodies are checked for NaN/Infinity
    add_routes(app, server)
    controlnet_api.add_routes(app, server)
    model_routes.add_routes(app, server)
    extra_routes.add_routes(app, server, extras)
    openai_api.add_routes(app, server)
    extras_api.add_routes(app, server)
    add_family_form_routes(app, server)  # the web page's family fields
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, max_bytes=server.limits.max_body_bytes)
    if credentials:
        app.add_middleware(BasicAuth, credentials=credentials)
    return app


def add_routes(app: FastAPI, server: Server) -> None:
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    @app.post("/sdapi/v1/txt2img", response_model=a1111.ImagesResponse, responses=GENERATION_ERRORS)
    async def txt2img(req: a1111.Txt2ImgRequest, request: Request):
        return await server.run("txt2img", req, request)

    @app.post("/sdapi/v1/img2img", response_model=a1111.ImagesResponse, responses=GENERATION_ERRORS)
    async def img2img(req: a1111.Img2ImgRequest, request: Request):
        return await server.run("img2img", req, request)

    @app.post("/sdrt/v1/outpaint", response_model=a1111.ImagesResponse, responses=GENERATION_ERRORS)
    async def outpaint(req: a1111.OutpaintRequest, request: Request):
        return await server.run("outpaint", req, request)

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return a1111.samplers_list()

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return a1111.schedulers_list()

    @app.get("/sdapi/v1/loras")
    def loras():  # A1111's Lora extension: name, alias, path (relative to the LoRA folder: no server paths), metadata
        return server.lora_listing()

    @app.get("/sdapi/v1/options")
    def get_options():
        return server.options

    @app.post("/sdapi/v1/options")
    async def set_options(values: dict):
        checked = {k: a1111.check_option(k, v, server.checkpoint_title) for k, v in values.items()}
        if "sd_vae" in checked:  # a name of --vae-dir (exported when a request first uses it)
            checked["sd_vae"] = server.extras.vaes.check(checked["sd_vae"], "options.sd_vae")
        await model_routes.apply(server, checked)  # a model switch, the LRU's size
        server.options.update(checked)
        return None

    @app.get("/sdapi/v1/progress", response_model=a1111.ProgressResponse)
    async def progress(skip_current_image: bool = False, id_task: str | None = None):
        """The running job's progress; with id_task (a request's force_task_id), that job's (idle if not running)."""
        return await server.backend.progress(skip_current_image, id_task)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt(id_task: str | None = None):
        """Stop the running job after its current step; with id_task, only the job with that force_task_id."""
        await server.backend.interrupt(id_task)
        return None

    @app.post("/sdapi/v1/png-info")
    def png_info(req: a1111.PngInfoRequest):
        return png_info_response(server.decode(req.image, "image"))


def parse_credentials(text: str) -> dict[str, str]:
    """A1111's --api-auth "user:pass[,user2:pass2]" -> {user: pass}; malformed text raises InvalidOption."""
    pairs = {}
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise InvalidOption("--api-auth", text, "user:password, or several separated by commas")
        pairs[user] = password
    return pairs


def serve(
    model_dir, host: str, port: int, api_auth: str | None, backend: str, limits: Limits, loras=None,
    controlnet_dir=None, folder: ModelsFolder | None = None, extras: Extras | None = None, upscaler_dir=None,
) -> int:  # fmt: skip
    """Load the model (or serve FOLDER's models, loaded when asked for) and serve until interrupted; UPSCALER_DIR:
    the exported upscalers hires fix and the extras routes offer."""
    try:
        import uvicorn
    except ImportError as e:
        raise SdrtError(f"`sdrt serve` needs the serve extra: pip install 'sdrt[serve]' ({e})") from None
    from sdrt.runtime.pipeline import Pipeline

    credentials = parse_credentials(api_auth) if api_auth else None
    if folder is None:
        pipe = Pipeline.load(model_dir, backend=backend, loras=loras, embeddings=extras and extras.embeddings_dir,
                             upscalers=upscaler_dir)  # fmt: skip
        pipe.controlnets.directory = None if controlnet_dir is None else Path(controlnet_dir)  # /controlnet/model_list
        app = create_app(pipe, limits, credentials, extras=extras)
    else:
        embeddings = extras and extras.embeddings_dir
        loaded = folder.loaded_models(backend, loras, embeddings, upscaler_dir, controlnet_dir)
        backend = LocalBackend(max_queue=limits.max_queue, loaded=loaded)
        backend.lora_dir = loras  # /sdapi/v1/loras lists the folder (no one Pipeline holds it)
        backend.controlnets = ControlNetCache("cpu", controlnet_dir)  # units validated against each request's model
        app = create_app(None, limits, credentials, backend=backend, extras=extras)
        folder.start(app.state.server)
    if host not in LOOPBACK and not credentials:
        print(f"sdrt serve: note: {host} without --api-auth: whoever reaches this port can use it", file=sys.stderr)
    print(f"sdrt serve: http://{host}:{port}/ (API docs at /docs)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    app.state.server.backend.stop()
    return 0
