"""Generation options: one schema. Each field of GenerationOptions holds its default, type, allowed range or values,
and how the interfaces see it: its CLI flag, its A1111 request field (or A1111 setting), its infotext key, and how it
is read from and written to the infotext. The CLI (cli.py), the server's A1111 mapping (server/a1111.py), the infotext
writer and reader (infotext.py) and `sdrt generate --from-png` are derived from it; `resolve` validates once against a
model's manifest, with errors naming the field, the value and what is allowed.

Adding an option: one field here, plus its use.
"""

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from sdrt.errors import InvalidOption, ModelError, check_int, check_number, is_int
from sdrt.runtime import hires_options as hires_fix
from sdrt.runtime import masks
from sdrt.runtime.conditioning import EMPHASES, MAX_CLIP_SKIP
from sdrt.runtime.controlnet import check_units
from sdrt.runtime.families import FLOW_SPECS, family_of, family_option_names
from sdrt.runtime.hires_options import float_array
from sdrt.runtime.image import format_number
from sdrt.runtime.lora import requested
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.option_mappings import (
    RNG_NAMES,
    a1111_mask_blur,
    a1111_mask_invert,
    if_masked,
    infotext_number,
    read_rng,
)
from sdrt.runtime.option_spec import Spec, option
from sdrt.runtime.rng import A1111_RNG_LABELS, GENERATORS
from sdrt.runtime.samplers import SAMPLER_ALIASES, SAMPLERS, resolve_sampler  # noqa: F401 (re-exported)
from sdrt.runtime.schedules import (  # noqa: F401 (re-exported)
    SCHEDULER_ALIASES,
    SCHEDULERS,
    SPACINGS,
    check_schedule,
    resolve_scheduler,
)
from sdrt.runtime.speed_options import SPEED_OPTIONS, check_speed_options

RNGS = tuple(GENERATORS)  # "torch" (= "cpu"), "gpu", "nv": see rng.py
# A1111's samplers with the "uses_ensd" option: the only ones whose infotext records ENSD (and only with eta != 0).
ENSD_SAMPLERS = ("Euler a", "DPM2 a", "DPM++ 2S a", "DPM fast", "DPM adaptive")
OUTPUT_TYPES = ("pil", "latent")
MAX_STEPS = 1000
MAX_BATCH = 64
MAX_BATCH_COUNT = 10_000
SEED_MAX = 2**32 - 1
MAX_MASK_BLUR = 64  # A1111's mask blur slider maximum
MAX_PROMPT_CHARS = 20_000  # about 70 chunks of 75 tokens: far past any real prompt, short of a memory hazard


def speed_option(name: str):
    default, kind, keywords = {**SPEED_OPTIONS, **FLOW_SPECS}[name]  # speed_options.py, flow_options.py
    return option(default, kind, **keywords)


@dataclass(frozen=True)
class GenerationOptions:
    """Every generation option once. The fields that the infotext writes come first, in A1111's order."""

    prompt: str = option("", "str", cli=False, a1111="prompt", help="the prompt (A1111's syntax)")
    negative_prompt: str = option("", "str", a1111="negative_prompt", help="what to steer away from")
    steps: int | None = option(None, "int", low=1, high=MAX_STEPS, a1111="steps", infotext="Steps",
                               write=lambda o, im: o.steps, help="default: the model's (20; FLUX.1 dev 28, schnell 4)")
    sampler: str = option(
        "Euler", "str", a1111="sampler_name", from_a1111=lambda r: r.sampler_name or r.sampler_index,
        infotext="Sampler", write=lambda o, im: o.sampler,
        help="Euler, Euler a, DDIM, DPM++ 2M, ... (or A1111's legacy 'DPM++ 2M Karras')")  # fmt: skip
    scheduler: str = option(
        "automatic", "str", a1111="scheduler", from_a1111=lambda r: r.scheduler or "automatic",
        infotext="Schedule type", write=lambda o, im: SCHEDULERS[o.scheduler],
        help="schedule type: " + ", ".join(SCHEDULERS))  # fmt: skip
    cfg_scale: float | None = option(None, "float", low=0, high=100, a1111="cfg_scale", infotext="CFG scale",
                                     write=lambda o, im: format_number(o.cfg_scale),
                                     help="classifier-free guidance, runs when > 1 (default: the model's: 7; FLUX.1 1)")
    seed: int = option(-1, "int", low=-1, high=SEED_MAX, a1111="seed", infotext="Seed", write=lambda o, im: im[0],
                       help="-1: random; image i of a run uses seed + i")  # fmt: skip
    width: int | None = option(None, "int", a1111="width", infotext="Size", part=1,
                               write=lambda o, im: f"{o.width}x{o.height}",
                               help="a multiple of 8 (default: the model's native size)")  # fmt: skip
    height: int | None = option(None, "int", a1111="height", infotext="Size", part=2,
                                help="a multiple of 8 (default: the model's native size)")  # fmt: skip
    subseed: int = option(-1, "int", low=-1, high=SEED_MAX, a1111="subseed", infotext="Variation seed",
                          write=lambda o, im: im[1] if o.subseed_strength else None,
                          help="A1111's variation seed (-1: random)")  # fmt: skip
    subseed_strength: float = option(0.0, "float", low=0, high=1, a1111="subseed_strength",
                                     infotext="Variation seed strength",
                                     write=lambda o, im: infotext_number(o.subseed_strength or None),
                                     help="0 to 1: how far to move towards the variation seed's noise")  # fmt: skip
    seed_resize_from_w: int = option(
        0, "int", a1111="seed_resize_from_w", from_a1111=lambda r: max(r.seed_resize_from_w, 0),
        infotext="Seed resize from", part=1,
        write=lambda o, im: f"{o.seed_resize_from_w}x{o.seed_resize_from_h}" if o.seed_resize_from_w else None,
        help="the width a seed was first used at (0: off)",
    )  # fmt: skip
    seed_resize_from_h: int = option(
        0, "int", a1111="seed_resize_from_h", from_a1111=lambda r: max(r.seed_resize_from_h, 0),
        infotext="Seed resize from", part=2, help="the height a seed was first used at (0: off)",
    )  # fmt: skip
    strength: float | None = option(0.75, "float", low=0, high=1, group="editing", a1111="denoising_strength",
                                    infotext="Denoising strength", write=lambda o, im: infotext_number(o.strength),
                                    help="img2img/inpainting denoising strength (default 0.75)")  # fmt: skip
    clip_skip: int = option(1, "int", setting="CLIP_stop_at_last_layers", infotext="Clip skip",
                            write=lambda o, im: o.clip_skip if o.clip_skip > 1 else None,
                            help="A1111's Clip skip: 2 = the penultimate layer")  # fmt: skip
    ensd: int = option(0, "int", low=0, high=SEED_MAX, setting="eta_noise_seed_delta", infotext="ENSD",
                       write=lambda o, im: o.ensd if o.records_ensd else None,
                       help="A1111's eta noise seed delta (31337 in many shared infotexts)")  # fmt: skip
    rng: str = option(
        "torch", "str", choices=RNGS, setting="randn_source", from_setting=lambda label: RNG_NAMES[label],
        infotext="RNG", write=lambda o, im: A1111_RNG_LABELS[o.rng], read=read_rng,
        help="noise source: torch (= cpu, A1111 'CPU'), gpu (A1111's default), nv",
    )  # fmt: skip
    eta: float | None = option(None, "float", low=0, high=1, a1111="eta", infotext="Eta", aliases=("Eta DDIM",),
                               write=lambda o, im: infotext_number(o.eta),
                               help="DDIM's and the ancestral samplers' eta (default: the sampler's)")  # fmt: skip
    mask_blur: int | None = option(4, "int", low=0, high=MAX_MASK_BLUR, group="editing", a1111="mask_blur",
                                   from_a1111=a1111_mask_blur, infotext="Mask blur", write=lambda o, im: o.mask_blur,
                                   help="Gaussian sigma in pixels (default 4)")  # fmt: skip
    hires: bool = option(False, "bool", **hires_fix.SPECS["hires"])  # hires fix (hires.py); strength: its denoising
    hires_scale: float = option(2.0, "float", **hires_fix.SPECS["hires_scale"])
    hires_resize_x: int = option(0, "int", **hires_fix.SPECS["hires_resize_x"])
    hires_resize_y: int = option(0, "int", **hires_fix.SPECS["hires_resize_y"])
    hires_upscaler: str | None = option(None, "str", **hires_fix.SPECS["hires_upscaler"])
    hires_steps: int = option(0, "int", high=MAX_STEPS, **hires_fix.SPECS["hires_steps"])
    hires_sampler: str | None = option(None, "str", **hires_fix.SPECS["hires_sampler"])
    hires_scheduler: str | None = option(None, "str", **hires_fix.SPECS["hires_scheduler"])
    hires_prompt: str = option("", "str", **hires_fix.SPECS["hires_prompt"])
    hires_negative_prompt: str = option("", "str", **hires_fix.SPECS["hires_negative_prompt"])
    hires_cfg: float | None = option(None, "float", **hires_fix.SPECS["hires_cfg"])
    timestep_spacing: str | None = option(None, "str", choices=SPACINGS, infotext="Timestep spacing",
                                          write=lambda o, im: o.timestep_spacing,
                                          help="leading, linspace or trailing (default: the model's)")  # fmt: skip
    guidance_rescale: float = option(0.0, "float", low=0, high=1, infotext="Guidance rescale",
                                     write=lambda o, im: infotext_number(o.guidance_rescale or None),
                                     help="0 to 1: Lin et al. 2023's phi (with cfg > 1)")  # fmt: skip
    emphasis: str = option("Original", "str", choices=EMPHASES, setting="emphasis", infotext="Emphasis",
                           help="prompt weights: Original, 'No norm', None")  # fmt: skip
    s_min_uncond: float = speed_option("s_min_uncond")  # these eight: speed_options.py (docs/guide/speed.md)
    s_min_uncond_all: bool = speed_option("s_min_uncond_all")
    skip_early_cond: float = speed_option("skip_early_cond")
    vae: str = speed_option("vae")
    vae_file: str | None = speed_option("vae_file")  # A1111's sd_vae (vae_swap.py)
    live_preview_content: str = speed_option("live_preview_content")
    deepcache_interval: int = speed_option("deepcache_interval")
    deepcache_branch: int | None = speed_option("deepcache_branch")
    deepcache_start: float = speed_option("deepcache_start")
    batch_size: int = option(1, "int", low=1, high=MAX_BATCH, a1111="batch_size", help="images per UNet batch")
    batch_count: int = option(1, "int", low=1, high=MAX_BATCH_COUNT, a1111="n_iter", help="number of batches")
    s_noise: float = option(1.0, "float", low=0, high=10, a1111="s_noise",
                            from_a1111=lambda r: 1.0 if r.s_noise is None else r.s_noise,
                            help="noise multiplier of the samplers that add noise")  # fmt: skip
    s_churn: float = option(0.0, "float", low=0, high=100, a1111="s_churn", from_a1111=lambda r: r.s_churn or 0.0,
                            help="Karras churn (Euler, Heun, DPM2)")  # fmt: skip
    s_tmin: float = option(0.0, "float", low=0, high=math.inf, a1111="s_tmin", from_a1111=lambda r: r.s_tmin or 0.0,
                           help="churn from this sigma")  # fmt: skip
    s_tmax: float = option(math.inf, "float", low=0, high=math.inf, a1111="s_tmax",
                           from_a1111=lambda r: r.s_tmax or math.inf,  # A1111: 0 or unset means infinity
                           help="churn up to this sigma")  # fmt: skip
    output_type: str = option("pil", "str", choices=OUTPUT_TYPES, group="output", cli=False)
    latents: np.ndarray | None = option(None, "array", group="output", cli=False)  # (N, C, h, w) float32
    init_image: Any = option(None, "image", group="editing", a1111="init_images",
                             help="img2img: the starting image")  # fmt: skip
    resize_mode: str = option("just resize", "str", group="editing", a1111="resize_mode",
                              help="just resize (default), crop and resize, resize and fill")  # fmt: skip
    mask: Any = option(None, "image", group="editing", a1111="mask", help="inpainting: white = repaint")
    inpainting_fill: str = option(
        "original", "str", group="editing", a1111="inpainting_fill",
        from_a1111=lambda r: if_masked(r, r.inpainting_fill),
        help="masked content: fill, original (default), latent noise, latent nothing",
    )  # fmt: skip
    inpaint_full_res: bool = option(False, "bool", group="editing", a1111="inpaint_full_res",
                                    from_a1111=lambda r: if_masked(r, r.inpaint_full_res),
                                    help="only masked: crop, generate, paste back")  # fmt: skip
    inpaint_full_res_padding: int = option(32, "int", group="editing", a1111="inpaint_full_res_padding",
                                           from_a1111=lambda r: if_masked(r, r.inpaint_full_res_padding),
                                           help="pixels around the mask's box (default 32)")  # fmt: skip
    inpainting_mask_invert: bool = option(False, "bool", group="editing", a1111="inpainting_mask_invert",
                                          from_a1111=a1111_mask_invert, help="repaint the black part")  # fmt: skip
    prompt_2: str | None = option(None, "str", group="sdxl", help="the second text encoder's prompt")
    negative_prompt_2: str | None = option(None, "str", group="sdxl", help="its negative prompt")
    original_size: tuple[int, int] | None = option(None, "pair", group="sdxl", help="H W micro-conditioning")
    crops_coords_top_left: tuple[int, int] | None = option(None, "pair", group="sdxl", help="TOP LEFT (default 0 0)")
    target_size: tuple[int, int] | None = option(None, "pair", group="sdxl", help="H W micro-conditioning")
    negative_original_size: tuple[int, int] | None = option(None, "pair", group="sdxl", help="H W")
    negative_crops_coords_top_left: tuple[int, int] | None = option(None, "pair", group="sdxl", help="TOP LEFT")
    negative_target_size: tuple[int, int] | None = option(None, "pair", group="sdxl", help="H W")
    aesthetic_score: float | None = option(None, "float", group="sdxl", help="refiner conditioning (default 6)")
    negative_aesthetic_score: float | None = option(None, "float", group="sdxl", help="refiner (default 2.5)")
    refiner: Any = option(None, "path", group="sdxl", help="an exported SDXL refiner folder: the second stage")
    refiner_switch_at: float | None = option(None, "float", group="sdxl",
                                             help="fraction of the noise schedule the base runs (0.8)")  # fmt: skip
    distilled_cfg_scale: float | None = speed_option("distilled_cfg_scale")  # these five: flow_options.py
    skip_guidance_layers: tuple | None = speed_option("skip_guidance_layers")
    skip_layer_guidance_scale: float | None = speed_option("skip_layer_guidance_scale")
    skip_layer_guidance_start: float | None = speed_option("skip_layer_guidance_start")
    skip_layer_guidance_stop: float | None = speed_option("skip_layer_guidance_stop")
    # LoRAs for programs, {name: weight or (te weight, unet weight)}: resolve appends them to the prompt as
    # <lora:name:te:unet> tags (A1111 records its default LoRA so), the prompt's tags being the one source (lora.py).
    loras: dict | None = option(None, "dict", group="output", cli=False, help="LoRAs added to the prompt's tags")
    controlnets: tuple = option((), "units", group="controlnet", cli=False,
                                help="ControlNet units (controlnet.ControlNetUnit), any number")  # fmt: skip
    control_maps: bool = option(False, "bool", group="output", cli=False,
                                help="append each ControlNet unit's control map to the images")  # fmt: skip
    init_latents: np.ndarray | None = option(None, "array", **hires_fix.SPECS["init_latents"])  # (N, C, h, w)
    # Set by resolve from the model's family (families/): its own options (SdxlOptions...; None), the steps an edit runs
    family_options: Any = field(default=None, init=False, compare=False)
    edit_steps: int = field(default=0, init=False, compare=False)

    @property
    def steps_run(self) -> int:
        """Steps actually sampled: with an init image the family's count for steps x strength (Family.edit_steps)."""
        return self.steps if self.strength is None or self.hires else self.edit_steps

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs when cfg_scale > 1, as in diffusers (cfg 0 or 1: conditional only)."""
        return self.cfg_scale > 1.0

    @property
    def seeds(self) -> list[int]:
        """A1111: image i of the run uses seed + i, so an image is the same alone or inside a batch.

        With a variation strength every image uses seed itself, and image i the variation seed subseed + i.
        """
        step = 0 if self.subseed_strength else 1
        return [(self.seed + i * step) % (SEED_MAX + 1) for i in range(self.batch_size * self.batch_count)]

    @property
    def subseeds(self) -> list[int]:
        """A1111: image i of the run uses the variation seed subseed + i."""
        return [(self.subseed + i) % (SEED_MAX + 1) for i in range(self.batch_size * self.batch_count)]

    @property
    def seed_resize_from(self) -> tuple[int, int] | None:
        """(height, width) in pixels that the seeds' noise is made at, or None."""
        return (self.seed_resize_from_h, self.seed_resize_from_w) if self.seed_resize_from_w else None

    @property
    def records_ensd(self) -> bool:
        """A1111 writes ENSD only for its "uses_ensd" samplers with eta != 0 (its default eta for them is 1)."""
        return bool(self.ensd) and self.sampler in ENSD_SAMPLERS and self.eta != 0

    def sampler_kwargs(self) -> dict:
        """The sampler knobs the user set (eta, s_noise, s_churn, s_tmin, s_tmax); unset eta is left out."""
        knobs = {"s_noise": self.s_noise, "s_churn": self.s_churn, "s_tmin": self.s_tmin, "s_tmax": self.s_tmax}
        return knobs if self.eta is None else {**knobs, "eta": self.eta}


OPTION_FIELDS = {f.name: f for f in fields(GenerationOptions) if f.init}


def spec(name: str) -> Spec:
    return OPTION_FIELDS[name].metadata["spec"]


def build_options(options: GenerationOptions | None = None, **overrides) -> GenerationOptions:
    """OPTIONS (default: all defaults) with OVERRIDES by field name; an unknown name is a TypeError, as for a call."""
    unknown = [name for name in overrides if name not in OPTION_FIELDS]
    if unknown:
        raise TypeError(f"unknown generation option {unknown[0]!r}; the options are GenerationOptions' fields")
    return dataclasses.replace(options or GenerationOptions(), **overrides)


def make_options(manifest: Manifest, **raw) -> GenerationOptions:
    """GenerationOptions from keyword arguments, validated against the model's manifest (resolve)."""
    return resolve(build_options(**raw), manifest)


# Float options with a range of their own (the family options' ranges are the family's: families/)
FLOAT_OPTIONS = tuple(name for name in OPTION_FIELDS if spec(name).kind == "float" and spec(name).low is not None)


def resolve(options: GenerationOptions, manifest: Manifest) -> GenerationOptions:
    """Validate every option against the model's manifest, fill in what depends on it (size, random seeds, the
    init image's size) and pin the sampler's name; the first bad option raises InvalidOption."""
    o = {name: getattr(options, name) for name in OPTION_FIELDS}
    for name in FLOAT_OPTIONS:  # NaN or an infinity is no value of any option, used or not (A1111 ignores some)
        if isinstance(o[name], float) and not math.isfinite(o[name]):
            _in_range(name, o[name])
    editing = o["init_image"] is not None or o["init_latents"] is not None
    if not editing:
        if o["mask"] is not None:
            raise InvalidOption("mask", "a mask", "None without init_image (the image to inpaint)")
        if manifest.unet_in_channels != manifest.latent_channels:
            raise ModelError(
                f"{manifest.folder} is an inpainting model (UNet takes {manifest.unet_in_channels} "
                "channels: latents, mask and masked-image latents); sdrt runs it for img2img and inpainting "
                "(pass init_image, and a mask), not txt2img"
            )
    elif o["init_latents"] is not None:
        hires_fix.check_init_latents(manifest, o)
    else:
        if o["latents"] is not None:
            raise InvalidOption("latents", "an array", "None with init_image (the init image gives the start)")
        o["init_image"] = image = masks.load_image(o["init_image"], "init_image")
        step = manifest.latent_downsample
        o["width"] = image.width // step * step if o["width"] is None else o["width"]
        o["height"] = image.height // step * step if o["height"] is None else o["height"]
    for name in ("prompt", "negative_prompt"):
        if not isinstance(o[name], str):
            raise InvalidOption(name, o[name], "a string")
        if len(o[name]) > MAX_PROMPT_CHARS:
            raise InvalidOption(name, f"a text of {len(o[name])} characters", f"at most {MAX_PROMPT_CHARS}")
    o["prompt"], o["loras"] = requested(o["prompt"], o["loras"])[0], None  # and its <lora:...> tags checked
    step = manifest.latent_downsample
    for name in ("width", "height"):
        size = manifest.native_size if o[name] is None else o[name]
        check_int(name, size, manifest.min_size, manifest.max_size)
        if size % step:
            raise InvalidOption(name, size, f"a multiple of {step} from {manifest.min_size} to {manifest.max_size}")
        o[name] = int(size)
    family = family_of(manifest)
    for name, default in family.option_defaults(manifest).items():  # steps, cfg_scale: the family's if not given
        o[name] = _in_range(name, default if o[name] is None else o[name])
    o["sampler"], o["scheduler"] = resolve_sampler(o["sampler"], o["scheduler"])
    for name in ("seed", "batch_size", "batch_count", "rng", "subseed", "subseed_strength"):
        o[name] = _in_range(name, o[name])
    for name in ("seed", "subseed"):
        o[name] = int(np.random.default_rng().integers(0, SEED_MAX + 1)) if o[name] == -1 else o[name]
    _check_seed_resize(manifest, o)
    for name in ("ensd", "output_type", "eta", "s_noise", "s_churn", "s_tmin", "s_tmax"):
        o[name] = _in_range(name, o[name])
    hires_fix.check(o, manifest, _in_range, MAX_STEPS)  # hires fix keeps strength: its denoising strength
    strength = None if o["strength"] is None else _in_range("strength", o["strength"])  # NaN refused, used or not
    o["strength"] = strength if editing or o["hires"] else None
    o["mask_blur"] = _in_range("mask_blur", o["mask_blur"]) if o["mask"] is not None else None
    o["clip_skip"] = check_int("clip_skip", o["clip_skip"], 1, MAX_CLIP_SKIP)
    o["emphasis"] = _in_range("emphasis", o["emphasis"])
    if editing:
        o["resize_mode"] = masks.check_resize_mode(o["resize_mode"])
        o["inpainting_fill"] = masks.check_inpainting_fill(o["inpainting_fill"])
    check_schedule(manifest.scheduler, o["sampler"], SAMPLERS[o["sampler"]][1], o["scheduler"], o["timestep_spacing"],
                   o["steps"])  # fmt: skip
    o["guidance_rescale"] = _in_range("guidance_rescale", o["guidance_rescale"])
    if o["guidance_rescale"] and o["cfg_scale"] <= 1:
        allowed = "0 when cfg_scale <= 1 (no guidance runs to rescale)"
        raise InvalidOption("guidance_rescale", o["guidance_rescale"], allowed)
    _check_latents(manifest, o)
    o["controlnets"] = check_units(o["controlnets"])
    check_speed_options(o, manifest, _in_range)
    if not isinstance(o["control_maps"], bool):
        raise InvalidOption("control_maps", o["control_maps"], "True or False")
    resolved = GenerationOptions(**o)
    owned = {name: o[name] for name in family_option_names() if o[name] is not None}
    family.refuse_options(manifest, owned)
    object.__setattr__(resolved, "family_options", family.resolve_options(manifest, owned))
    object.__setattr__(resolved, "edit_steps", family.edit_steps(o["steps"], o["strength"] or 0.0))
    family.check_options(manifest, resolved)
    return resolved


def _check_seed_resize(manifest: Manifest, o: dict) -> None:
    """SEED_RESIZE_FROM_W/_H: both off (0 or -1) or both a size the model takes."""
    step = manifest.latent_downsample
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        size = o[name]
        off = is_int(size) and size in (0, -1)
        if not off and not (is_int(size) and manifest.min_size <= size <= manifest.max_size and size % step == 0):
            raise InvalidOption(
                name, size, f"0 or -1 (off), or a multiple of {step} from {manifest.min_size} to {manifest.max_size}"
            )
        o[name] = 0 if off else int(size)
    if bool(o["seed_resize_from_w"]) != bool(o["seed_resize_from_h"]):
        name = "seed_resize_from_h" if o["seed_resize_from_w"] else "seed_resize_from_w"
        raise InvalidOption(name, o[name], "a size too: seed_resize_from_w and _h are set together")


def _in_range(name: str, value):
    """VALUE checked against its field's spec (range, or choices; None where the default is None)."""
    s = spec(name)
    if value is None and OPTION_FIELDS[name].default is None:
        return None
    if s.choices is not None:
        if value not in s.choices:
            raise InvalidOption(name, value, ", ".join(s.choices))
        return value
    if s.kind == "int":
        return check_int(name, value, int(s.low), int(s.high))
    return check_number(name, value, s.low, s.high, allow_inf=math.isinf(s.high))


def _check_latents(manifest: Manifest, o: dict) -> None:
    """LATENTS, when given: float32 (batch_size * batch_count, C, height/8, width/8)."""
    if o["latents"] is None:
        return
    want = (o["batch_size"] * o["batch_count"], *family_of(manifest).latent_shape(manifest, o["width"], o["height"]))
    latents = float_array("latents", o["latents"])
    if latents.shape != want:
        allowed = f"shape {want} (batch_size * batch_count, C, height/8, width/8)"
        raise InvalidOption("latents", f"array of shape {latents.shape}", allowed)
    o["latents"] = latents
