"""A1111's API request fields and defaults (modules/api/models.py over processing.py), and their mapping to sdrt.

Field names and defaults are A1111's (steps 50, 512x512, sampler_index "Euler", img2img denoising_strength 0.75,
inpainting_fill 0 = fill, inpaint_full_res True with padding 0, ...). Fields for features sdrt does not have
(hires fix, face restoration, tiling, scripts) are accepted at their defaults and refused
(422 naming the field) otherwise; unknown fields are ignored, as A1111's pydantic models ignore them.
"""

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sdrt.errors import InvalidOption, is_int
from sdrt.runtime.a1111_schedules import POLYEXPONENTIAL_RHO
from sdrt.runtime.families import Family, family_of
from sdrt.runtime.infotext import generate_kwargs as infotext_kwargs
from sdrt.runtime.infotext import parse_infotext
from sdrt.runtime.option_mappings import UNSET
from sdrt.runtime.options import (
    ENSD_SAMPLERS,
    OPTION_FIELDS,
    RNG_NAMES,
    SAMPLER_ALIASES,
    SAMPLERS,
    SCHEDULER_ALIASES,
    SCHEDULERS,
    build_options,
    resolve,
    spec,
)
from sdrt.server.a1111_settings import check_setting
from sdrt.server.speed_settings import SETTING_LABELS, SPEED_SETTINGS, apply_extension_names, check_speed_setting
from sdrt.server.vaes import info_names
from sdrt.version import __version__

RANDN_SOURCES = RNG_NAMES  # A1111's randn_source option -> sdrt's rng
# Options /sdapi/v1/options reports and accepts, with A1111's defaults (sd_model_checkpoint is set at start).
DEFAULT_OPTIONS = {
    "sd_model_checkpoint": "",
    "CLIP_stop_at_last_layers": 1,
    "emphasis": "Original",
    "eta_noise_seed_delta": 0,
    "randn_source": "GPU",
    "live_previews_enable": True,
    "show_progress_every_n_steps": 10,
    "samples_format": "png",
    **SPEED_SETTINGS,  # previews, TAESD, NGMS, DeepCache (speed_settings.py)
}


class GenerationRequest(BaseModel):
    """The fields txt2img and img2img share (A1111's StableDiffusionProcessing)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    distilled_cfg_scale: float | None = None  # Forge's (FLUX.1 dev); None: the model's default, 3.5
    skip_guidance_layers: list[int] | None = None  # SD 3.5 skip-layer guidance, diffusers' names
    skip_layer_guidance_scale: float | None = None
    skip_layer_guidance_start: float | None = None
    skip_layer_guidance_stop: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    sampler_index: str = "Euler"
    script_name: str | None = None
    script_args: list = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(GenerationRequest):
    """POST /sdapi/v1/txt2img (A1111's StableDiffusionProcessingTxt2Img)."""

    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_cfg: float | None = None
    firstpass_image: str | None = None


class Img2ImgRequest(GenerationRequest):
    """POST /sdapi/v1/img2img (A1111's StableDiffusionProcessingImg2Img): init_images and mask are base64 images."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = Field(default=False, exclude=True)


class OutpaintRequest(GenerationRequest):
    """POST /sdrt/v1/outpaint: extend `image` by left/right/up/down pixels (multiples of 8) and paint the new area."""

    image: str = Field(description="the base64-encoded image to extend; its sides must be multiples of 8")
    left: int = 0
    right: int = 0
    up: int = 0
    down: int = 0
    width: int | None = None  # the canvas size; other values are refused
    height: int | None = None
    denoising_strength: float = 1.0
    mask_blur: int = 4
    inpainting_fill: int = 1  # original: the prefilled canvas


class PngInfoRequest(BaseModel):
    image: str = Field(description="a base64-encoded PNG")


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: str | None = None
    textinfo: str | None = None


class ImagesResponse(BaseModel):
    images: list[str] | None = None
    parameters: dict
    info: str


# field -> (values sdrt accepts, why it refuses others)
UNSUPPORTED = {
    "restore_faces": ((None, False), "sdrt has no face restoration"),
    "tiling": ((None, False), "sdrt has no tiling"),
    "script_name": ((None, ""), "sdrt has no scripts"),
    "script_args": (([],), "sdrt has no scripts"),
    "alwayson_scripts": (({},), "sdrt has no scripts"),
    "firstpass_image": ((None, ""), "sdrt's hires fix makes its own first pass"),
    "firstphase_width": ((0,), "A1111's old hires fix sizes: give width/height and hr_scale or hr_resize_x/y"),
    "firstphase_height": ((0,), "A1111's old hires fix sizes: give width/height and hr_scale or hr_resize_x/y"),
    "hr_checkpoint_name": ((None, "", "Use same checkpoint"), "sdrt's hires fix uses the loaded model"),
    "initial_noise_multiplier": ((None, 1, 1.0), "sdrt uses A1111's default multiplier 1"),
    "latent_mask": ((None, ""), "sdrt derives the latent mask from `mask`"),
    "mask_round": ((True,), "sdrt always rounds the mask (A1111's default)"),
}


def check_supported(req: GenerationRequest) -> None:
    """Refuse fields set for features sdrt does not have (InvalidOption naming the field)."""
    for name, (accepted, why) in UNSUPPORTED.items():
        value = getattr(req, name, accepted[0])
        if not any(value == ok and type(value) is type(ok) or value is ok for ok in accepted):
            raise InvalidOption(name, value, f"{accepted[0]!r}: {why}")


def apply_infotext(req: GenerationRequest, options: dict) -> None:
    """A1111's apply_infotext: the `infotext` field's parameters fill the fields the request did not set, and
    its settings that differ from the server's OPTIONS become override_settings (unless the request has them)."""
    if not req.infotext:
        return
    given = req.model_fields_set
    overrides = dict(req.override_settings or {})
    labels = {"randn_source": {v: k for k, v in RANDN_SOURCES.items()}, **SETTING_LABELS}  # option value -> label
    for name, value in infotext_kwargs(parse_infotext(req.infotext)).items():
        s = spec(name)
        if s.setting is not None:
            value = labels.get(s.setting, {}).get(value, value)
            if options[s.setting] != value:
                overrides.setdefault(s.setting, value)
        elif s.a1111 in type(req).model_fields and s.a1111 not in given:
            setattr(req, s.a1111, value)
    if overrides:
        req.override_settings = overrides


def settings(req: GenerationRequest, options: dict, checkpoint_title) -> dict:
    """The server options with the request's override_settings applied (validated like POST /options)."""
    merged = dict(options)
    for key, value in (req.override_settings or {}).items():
        merged[key] = check_option(key, value, checkpoint_title, "override_settings")
    apply_extension_names(merged)
    return merged


def check_option(key: str, value, checkpoint_title, where: str = "options"):
    """One option's value, validated (InvalidOption naming WHERE.key); unknown options are refused.
    CHECKPOINT_TITLE(value, field) -> the model's title (InvalidOption listing the titles if there is none)."""
    field = f"{where}.{key}"
    if key not in DEFAULT_OPTIONS:  # A1111's other settings: recorded, or refused if they would change images
        return check_setting(key, value, field)
    if key == "sd_model_checkpoint":
        return checkpoint_title(value, field)
    if key == "randn_source":
        if value not in RANDN_SOURCES:
            raise InvalidOption(field, value, ", ".join(RANDN_SOURCES))
        return value
    if key == "samples_format":
        if value != "png":
            raise InvalidOption(field, value, "png")
        return value
    if key == "emphasis":
        if not isinstance(value, str):
            raise InvalidOption(field, value, "Original, No norm or None")
        return value
    if key in SPEED_SETTINGS:
        return check_speed_setting(field, key, value)
    if key == "live_previews_enable":
        if not isinstance(value, bool):
            raise InvalidOption(field, value, "true or false")
        return value
    if not is_int(value):
        raise InvalidOption(field, value, "an integer")
    return value


def generate_kwargs(req: GenerationRequest, settings: dict) -> dict:
    """GenerationOptions fields from an A1111 request and the server's SETTINGS (its override_settings applied),
    each as the options schema maps it (a request field, or an A1111 setting). Images are decoded by the server."""
    kwargs = {}
    for name in OPTION_FIELDS:
        s = spec(name)
        request_value = getattr(req, s.a1111, None) if s.a1111 in type(req).model_fields else None
        if s.setting is not None and request_value is None:  # a request field wins over its setting (s_min_uncond)
            value = settings[s.setting]
            kwargs[name] = value if s.from_setting is None else s.from_setting(value)
        elif s.a1111 is not None and s.kind != "image" and s.a1111 in type(req).model_fields:
            value = getattr(req, s.a1111) if s.from_a1111 is None else s.from_a1111(req)
            if value is not UNSET:
                kwargs[name] = value
    return kwargs


def family_defaults(req: GenerationRequest, kwargs: dict, manifest) -> None:
    """A model family's own defaults (FLUX.1: its steps and CFG 1) for the fields the request leaves out, in place of
    the request's A1111 defaults (steps 50, CFG 7), which the families keeping A1111's defaults still get."""
    family = family_of(manifest)
    a1111_family = Family.option_defaults(family, manifest)
    for name, value in family.option_defaults(manifest).items():
        if spec(name).a1111 not in req.model_fields_set and value != a1111_family[name]:
            kwargs[name] = value


def resolve_request(manifest, kwargs: dict, inputs: dict):
    """Validate KWARGS (with INPUTS, such as the image an outpaint extends) once, before queueing, and pin what
    resolving chose (random seeds, sampler names) into KWARGS, so that the job generates what the response says."""
    opts = resolve(build_options(**kwargs, **inputs), manifest)
    for name in ("seed", "subseed", "sampler", "scheduler"):
        kwargs[name] = getattr(opts, name)
    return opts


def info_json(images, manifest, opts, clip_skip: int, inpainting: bool, styles=()) -> str:
    """A1111's Processed.js(): the run's parameters, every image's seed and infotext."""
    total = opts.batch_size * opts.batch_count
    infotexts = [im.info.get("parameters", "") for im in images]
    extra = {"Schedule type": SCHEDULERS[opts.scheduler]}
    vae_name, vae_hash = info_names(opts.vae_file)  # a swapped VAE (sd_vae), or None
    if opts.records_ensd:
        extra["ENSD"] = opts.ensd
    return json.dumps(
        {
            "prompt": opts.prompt,
            "all_prompts": [opts.prompt] * total,
            "negative_prompt": opts.negative_prompt,
            "all_negative_prompts": [opts.negative_prompt] * total,
            "seed": opts.seeds[0],
            "all_seeds": opts.seeds,
            "subseed": opts.subseeds[0],
            "all_subseeds": opts.subseeds,
            "subseed_strength": opts.subseed_strength,
            "width": opts.width,
            "height": opts.height,
            "sampler_name": opts.sampler,
            "cfg_scale": opts.cfg_scale,
            "steps": opts.steps,
            "batch_size": opts.batch_size,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": manifest.model_name,
            "sd_model_hash": manifest.model_hash or None,
            "sd_vae_name": vae_name,
            "sd_vae_hash": vae_hash,
            "seed_resize_from_w": opts.seed_resize_from_w or -1,
            "seed_resize_from_h": opts.seed_resize_from_h or -1,
            "denoising_strength": opts.strength,
            "extra_generation_params": extra,
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": list(styles or ()),
            "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"),
            "clip_skip": clip_skip,
            "is_using_inpainting_conditioning": inpainting,
            "version": f"sdrt {__version__}",
        }
    )


def samplers_list() -> list[dict]:
    """GET /sdapi/v1/samplers: A1111's SamplerItem for each sampler sdrt runs."""
    aliases = {name: [a for a, target in SAMPLER_ALIASES.items() if target == name] for name in SAMPLERS}
    return [
        {"name": name, "aliases": aliases[name], "options": {"uses_ensd": "True"} if name in ENSD_SAMPLERS else {}}
        for name in SAMPLERS
    ]


KARRAS_RHO = 7.0  # Karras et al. 2022's rho, A1111's default_rho for its karras schedule


def schedulers_list() -> list[dict]:
    """GET /sdapi/v1/schedulers: A1111's SchedulerItem for each schedule type sdrt has."""
    return [
        {
            "name": name,
            "label": label,
            "aliases": [a for a, target in SCHEDULER_ALIASES.items() if target == name] or None,
            "default_rho": {"karras": KARRAS_RHO, "polyexponential": POLYEXPONENTIAL_RHO}.get(name, -1),
            "need_inner_model": name in ("uniform", "sgm_uniform", "simple", "normal", "ddim", "beta"),
        }
        for name, label in SCHEDULERS.items()
    ]


def request_field(field: str) -> str:
    """The A1111 request field (or override setting) a GenerationOptions field comes from, for error messages."""
    if field not in OPTION_FIELDS:
        return field
    s = spec(field)
    return f"override_settings.{s.setting}" if s.setting else s.a1111 or field
