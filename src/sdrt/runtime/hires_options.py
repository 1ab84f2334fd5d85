"""Hires fix's options (hires.py runs it): their specs as GenerationOptions declares them (SPECS: CLI flag, A1111
field, infotext key), A1111's latent upscale modes, and the plan of the second pass (A1111's
calculate_target_resolution and setup_img2img_steps), validated for resolve (options.py)."""

from dataclasses import dataclass

import numpy as np

from sdrt.errors import InvalidOption, check_int
from sdrt.runtime.image import format_number

LATENT_MODES = {  # A1111's shared.latent_upscale_modes: name -> (torch interpolate mode, antialias)
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
DEFAULT_UPSCALER = "Latent"  # A1111's latent_upscale_default_mode, used when hr_upscaler is not given
HIRES_STRENGTH = 0.75  # A1111's StableDiffusionProcessingTxt2Img.denoising_strength default
MAX_STRENGTH_FOR_STEPS = 0.999  # A1111's setup_img2img_steps: steps / min(strength, 0.999)


def entry(name: str, unless_equal: str | None = None):
    """An infotext writer for option NAME: its value with hires fix, when set (and not equal to option UNLESS_EQUAL)."""

    def write(opts, seeds=None):
        value = getattr(opts, name)
        if not opts.hires or value in (None, "", 0) or (unless_equal and value == getattr(opts, unless_equal)):
            return None
        return format_number(value) if isinstance(value, float) else value

    return write


def same(field: str, label: str):
    """An A1111 request reader for hires FIELD: None for "the first pass's" (None, "", or A1111's LABEL)."""
    return lambda request: None if getattr(request, field) in (None, "", label) else getattr(request, field)


def write_upscale(opts, seeds=None) -> str | None:
    """The infotext's "Hires upscale" (hr_scale, when no resize is given)."""
    if not opts.hires or opts.hires_resize_x or opts.hires_resize_y:
        return None
    return format_number(opts.hires_scale)


def write_resize(opts, seeds=None) -> str | None:
    """The infotext's "Hires resize" (WxH, when either is given)."""
    if not opts.hires or not (opts.hires_resize_x or opts.hires_resize_y):
        return None
    return f"{opts.hires_resize_x}x{opts.hires_resize_y}"


def write_scheduler(opts, seeds=None) -> str | None:
    """The infotext's "Hires schedule type": the hires schedule's label, when it is given and not the first pass's."""
    from sdrt.runtime.schedules import SCHEDULERS

    if not opts.hires or opts.hires_scheduler in (None, opts.scheduler):
        return None
    return SCHEDULERS[opts.hires_scheduler]


# The options schema's hires fields (options.py declares each with its default and kind): option() keywords.
SPECS = {
    "hires": dict(group="hires", a1111="enable_hr", infotext="Hires upscale", aliases=("Hires resize-1",),
                  write=lambda o, im: None, read=lambda text: True,
                  help="txt2img, then upscale and img2img at the hires size (A1111's enable_hr)"),
    "hires_scale": dict(low=1, high=8, group="hires", a1111="hr_scale", infotext="Hires upscale",
                        write=write_upscale, help="upscale by (default 2)"),
    "hires_resize_x": dict(group="hires", a1111="hr_resize_x", infotext="Hires resize", part=1, write=write_resize,
                           help="resize width to (0: by scale)"),
    "hires_resize_y": dict(group="hires", a1111="hr_resize_y", infotext="Hires resize", part=2,
                           help="resize height to (0: by scale)"),
    "hires_upscaler": dict(group="hires", a1111="hr_upscaler", infotext="Hires upscaler", write=entry("hires_upscaler"),
                           help="Latent (default), Latent (bicubic), ..., Lanczos, a model"),
    "hires_steps": dict(low=0, group="hires", a1111="hr_second_pass_steps", infotext="Hires steps",
                        write=entry("hires_steps"), help="second-pass steps (0: --steps)"),
    "hires_sampler": dict(group="hires", a1111="hr_sampler_name", infotext="Hires sampler",
                          from_a1111=same("hr_sampler_name", "Use same sampler"),
                          write=entry("hires_sampler", "sampler"),
                          help="second-pass sampler (default: --sampler)"),
    "hires_scheduler": dict(group="hires", a1111="hr_scheduler", from_a1111=same("hr_scheduler", "Use same scheduler"),
                            infotext="Hires schedule type", write=write_scheduler,
                            help="second-pass schedule type (default: --scheduler)"),
    "hires_prompt": dict(group="hires", a1111="hr_prompt", infotext="Hires prompt",
                         write=entry("hires_prompt", "prompt"), help="second-pass prompt"),
    "hires_negative_prompt": dict(group="hires", a1111="hr_negative_prompt", infotext="Hires negative prompt",
                                  write=entry("hires_negative_prompt", "negative_prompt"),
                                  help="second-pass negative prompt"),
    "hires_cfg": dict(low=0, high=100, group="hires", a1111="hr_cfg", infotext="Hires CFG Scale",
                      write=entry("hires_cfg", "cfg_scale"), help="second-pass CFG scale (default: --cfg-scale)"),
    "init_latents": dict(group="output", cli=False, help="img2img from (N, C, h, w) latents (hires fix's 2nd pass)"),
}  # fmt: skip


@dataclass(frozen=True)
class HiresPlan:
    """What the second pass does, from the resolved options (plan)."""

    upscale_to: tuple[int, int]  # (width, height): A1111's hr_upscale_to_x/y, before the crop
    truncate: tuple[int, int]  # (x, y) latent columns / rows cut (hr_resize_x and _y both given, other aspect)
    size: tuple[int, int]  # (width, height) of the second pass: the latents' size * 8
    upscaler: str
    steps: int  # the second pass's sampled steps
    schedule_steps: int  # the schedule it is cut from: int(steps / min(strength, 0.999))


def plan(opts, step: int = 8) -> HiresPlan:
    """A1111's calculate_target_resolution and setup_img2img_steps for OPTS (STEP: the latent downsample)."""
    width, height, rx, ry = opts.width, opts.height, opts.hires_resize_x, opts.hires_resize_y
    truncate = (0, 0)
    if rx == 0 and ry == 0:
        to = (int(width * opts.hires_scale), int(height * opts.hires_scale))
    elif ry == 0:
        to = (rx, rx * height // width)
    elif rx == 0:
        to = (ry * width // height, ry)
    else:
        to = (rx, rx * height // width) if width / height < rx / ry else (ry * width // height, ry)
        truncate = ((to[0] - rx) // step, (to[1] - ry) // step)
    size = ((to[0] // step - truncate[0]) * step, (to[1] // step - truncate[1]) * step)
    steps = opts.hires_steps or opts.steps
    schedule_steps = int(steps / min(opts.strength, MAX_STRENGTH_FOR_STEPS)) if opts.strength > 0 else steps
    return HiresPlan(to, truncate, size, opts.hires_upscaler or DEFAULT_UPSCALER, steps, max(schedule_steps, steps))


def check(o: dict, manifest, in_range, max_steps: int) -> None:
    """Validate the hires options of the options dict O (resolve's, sizes and steps already checked) in place:
    the hires sampler, the hires size within the model's limits, and what hires fix cannot combine with.
    IN_RANGE(name, value): options.py's check of a field against its spec; MAX_STEPS: its step limit."""
    from sdrt.runtime.samplers import resolve_sampler

    if not isinstance(o["hires"], bool):
        raise InvalidOption("hires", o["hires"], "True or False")
    if not o["hires"]:
        return
    for name in ("init_image", "init_latents", "refiner"):
        if o[name] is not None:
            raise InvalidOption(name, "given", "None with hires fix (hires fix is txt2img's second pass)")
    o["strength"] = HIRES_STRENGTH if o["strength"] is None else o["strength"]
    for name in ("hires_scale", "hires_steps", "hires_cfg", "strength"):
        o[name] = in_range(name, o[name])
    for name in ("hires_resize_x", "hires_resize_y"):
        o[name] = 0 if o[name] == 0 else check_int(name, o[name], manifest.min_size, manifest.max_size)
    for name in ("hires_upscaler", "hires_prompt", "hires_negative_prompt"):
        if o[name] is not None and not isinstance(o[name], str):
            raise InvalidOption(name, o[name], "a string")
    if o["hires_sampler"] is not None or o["hires_scheduler"] is not None:
        sampler, scheduler = resolve_sampler(o["hires_sampler"] or o["sampler"], o["hires_scheduler"] or o["scheduler"])
        o["hires_sampler"] = sampler if o["hires_sampler"] is not None else None
        o["hires_scheduler"] = scheduler if o["hires_scheduler"] is not None else None
    p = plan(_View(o), manifest.latent_downsample)
    for name, size in zip(("width", "height"), p.size, strict=True):
        if not manifest.min_size <= size <= manifest.max_size:
            field = "hires_scale" if not (o["hires_resize_x"] or o["hires_resize_y"]) else f"hires_resize_{name[0]}"
            allowed = f"a hires {name} from {manifest.min_size} to {manifest.max_size} (this one: {size})"
            raise InvalidOption(field, o[field], allowed)
    if p.schedule_steps > max_steps:
        allowed = f"a strength for which hires steps / strength is at most {max_steps}"
        raise InvalidOption("strength", o["strength"], allowed)


class _View:
    """Attribute access to resolve's options dict (plan reads options by attribute)."""

    def __init__(self, o: dict):
        self.__dict__.update(o)


def check_init_latents(manifest, o: dict) -> None:
    """INIT_LATENTS: float32 (batch_size * batch_count, C, h, w), with no init image, mask or start latents; the size
    follows them."""
    for name in ("init_image", "mask", "latents"):
        if o[name] is not None:
            raise InvalidOption(name, "given", "None with init_latents")
    latents = float_array("init_latents", o["init_latents"])
    n = o["batch_size"] * o["batch_count"]
    if latents.ndim != 4 or latents.shape[:2] != (n, manifest.latent_channels):
        allowed = f"shape ({n}, {manifest.latent_channels}, h, w) (batch_size * batch_count, C, height/8, width/8)"
        raise InvalidOption("init_latents", f"array of shape {latents.shape}", allowed)
    step = manifest.latent_downsample
    for name, size in (("height", latents.shape[2] * step), ("width", latents.shape[3] * step)):
        if o[name] not in (None, size):
            raise InvalidOption(name, o[name], f"{size}: init_latents' {name}")
        o[name] = size
    o["init_latents"] = latents


def float_array(field: str, value) -> np.ndarray:
    """VALUE as a float32 array; InvalidOption naming FIELD when it is none (a dict, a string, ragged lists)."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidOption(field, type(value).__name__, "a float32 array of latents") from None
    if not np.isfinite(array).all():
        raise InvalidOption(field, "an array with NaN, infinite or out-of-float32 values", "finite float32 latents")
    return array
