"""Hires fix (A1111's StableDiffusionProcessingTxt2Img with enable_hr): txt2img at the first-pass size, an upscale
of its latents (a latent mode: torch's interpolate, resample.py) or of its decoded images (an image upscaler,
upscale.py, then the VAE encoder), then img2img at the hires size from those latents, as a stage around
Pipeline.generate: two ordinary generate calls, the second with `init_latents`.

A1111's semantics kept: the target size (hr_scale, or hr_resize_x/y with the crop of calculate_target_resolution);
the second pass runs exactly hr_second_pass_steps (or steps) of a schedule of int(steps / min(strength, 0.999))
(setup_img2img_steps with fixed steps); its noise is each image's seed drawn afresh at the hires latent size
(rng.ImageRNG(...).next()), its sampler, schedule type, prompts and CFG the hires ones where given. The latents
of an image upscaler's output are the VAE posterior's mean (A1111 samples it from an unseeded global generator).
"""

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from sdrt.errors import Interrupted, InvalidOption, check_int
from sdrt.runtime.image import format_number
from sdrt.runtime.resample import interpolate

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


def check(o: dict, manifest) -> None:
    """Validate the hires options of the options dict O (resolve's, sizes and steps already checked) in place:
    the hires sampler, the hires size within the model's limits, and what hires fix cannot combine with."""
    from sdrt.runtime.options import MAX_STEPS
    from sdrt.runtime.options import _in_range as in_range
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
    if p.schedule_steps > MAX_STEPS:
        allowed = f"a strength for which hires steps / strength is at most {MAX_STEPS}"
        raise InvalidOption("strength", o["strength"], allowed)


class _View:
    """Attribute access to resolve's options dict (plan reads options by attribute)."""

    def __init__(self, o: dict):
        self.__dict__.update(o)


def second_pass_options(opts, p: HiresPlan, latents: np.ndarray):
    """The img2img options of the second pass from INIT latents (N, C, h, w) at the hires size."""
    strength = min(1.0, (p.steps + 0.5) / p.schedule_steps) if opts.strength > 0 else 0.0  # steps_run = p.steps
    return replace(
        opts, hires=False, width=p.size[0], height=p.size[1], steps=p.schedule_steps if strength else p.steps,
        strength=strength, sampler=opts.hires_sampler or opts.sampler,
        scheduler=opts.hires_scheduler or opts.scheduler, prompt=opts.hires_prompt or opts.prompt,
        negative_prompt=opts.hires_negative_prompt or opts.negative_prompt,
        cfg_scale=opts.cfg_scale if opts.hires_cfg is None else opts.hires_cfg, latents=None, init_latents=latents,
    )  # fmt: skip


def upscale_latents(pipe, latents: np.ndarray, p: HiresPlan) -> np.ndarray:
    """(N, C, h, w) first-pass latents -> (N, C, H/8, W/8) latents of the second pass, cropped as A1111 does."""
    step = pipe.manifest.latent_downsample
    size = (p.upscale_to[1] // step, p.upscale_to[0] // step)  # (rows, cols)
    if p.upscaler in LATENT_MODES:
        mode, antialias = LATENT_MODES[p.upscaler]
        up = interpolate(latents, size, mode, antialias)
    else:
        up = np.concatenate([_encode(pipe, _upscaled_image(pipe, z, p), size) for z in latents])
    tx, ty = p.truncate
    return np.ascontiguousarray(up[:, :, ty // 2 : up.shape[2] - (ty + 1) // 2, tx // 2 : up.shape[3] - (tx + 1) // 2])


def _upscaled_image(pipe, z: np.ndarray, p: HiresPlan):
    """One latent (C, h, w) decoded to an 8-bit image as A1111's sample_hr_pass makes it (255 * value, truncated),
    then resized to upscale_to by the upscaler (images.resize_image)."""
    unit = np.clip((pipe.decode(z[None])[0] + 1) / 2, 0, 1).transpose(1, 2, 0)  # (H, W, 3) in [0, 1]
    image = Image.fromarray((unit * 255).astype(np.uint8), "RGB")
    return pipe.upscalers.resize(image, *p.upscale_to, p.upscaler)


def _encode(pipe, image, size) -> np.ndarray:
    """IMAGE cut to SIZE * 8 pixels from its top left (the VAE encoder drops what does not fill a latent) -> its
    posterior mean (1, C, h, w)."""
    step = pipe.manifest.latent_downsample
    pixels = np.asarray(image.crop((0, 0, size[1] * step, size[0] * step)), dtype=np.float32) / 127.5 - 1
    pixels = pixels.transpose(2, 0, 1)[None]  # (1, 3, H, W) in [-1, 1]
    latent_shape = (1, pipe.manifest.latent_channels, *size)
    return pipe.vae.encode(pixels, lambda: np.zeros(latent_shape, np.float32))


def run(pipe, opts, progress: bool = True, callback=None):
    """Hires fix for the resolved OPTS (opts.hires True): images (or latents) as Pipeline.generate returns them."""
    p = plan(opts, pipe.manifest.latent_downsample)
    if p.upscaler not in LATENT_MODES:
        pipe.upscalers.check("hires_upscaler", p.upscaler)
    total = opts.batch_count * (opts.steps + p.steps)

    def relay(offset):
        if callback is None:
            return None
        return lambda step, _, denoised: callback(offset + step, total, denoised)

    first = replace(opts, hires=False, strength=None, output_type="latent", control_maps=False)
    latents = pipe.generate(options=first, progress=progress, callback=relay(0))
    done = len(latents) // opts.batch_size  # batches the first pass finished (all, unless interrupted)
    if done == 0:
        return latents if opts.output_type == "latent" else []
    latents = upscale_latents(pipe, latents[: done * opts.batch_size], p)
    second = second_pass_options(replace(opts, batch_count=done), p, latents)
    try:
        out = pipe.generate(options=second, progress=progress, callback=relay(opts.batch_count * opts.steps))
    except Interrupted:
        out = []
    if opts.output_type == "latent":
        return out
    for i, im in enumerate(out[: len(latents)]):
        im.info["parameters"] = _infotext(pipe, replace(opts, batch_count=done), second, im.info["parameters"], i)
    return out


def _infotext(pipe, opts, second, text: str, i: int) -> str:
    """Image I's infotext for the whole request: the options' own entries (first-pass size, steps, sampler, the hires
    keys) plus the notes the second pass wrote (LoRA and TI hashes, ControlNet units, ...)."""
    from sdrt.runtime.infotext import parse_infotext, write_infotext

    seed, subseed, model = opts.seeds[i], opts.subseeds[i], pipe.model_infotext()
    own = parse_infotext(write_infotext(second, seed, subseed, model, {}))
    notes = {k: v for k, v in parse_infotext(text).items() if k not in own}
    for key in [k for k in notes if k.endswith("-1") and k[:-2] + "-2" in notes]:  # "AxB" values parse in two
        notes[key[:-2]] = f"{notes.pop(key)}x{notes.pop(key[:-2] + '-2')}"
    return write_infotext(opts, seed, subseed, model, notes)


def check_init_latents(manifest, o: dict) -> None:
    """INIT_LATENTS: float32 (batch_size * batch_count, C, h, w), with no init image, mask or start latents; the size
    follows them."""
    for name in ("init_image", "mask", "latents"):
        if o[name] is not None:
            raise InvalidOption(name, "given", "None with init_latents")
    latents = np.asarray(o["init_latents"], dtype=np.float32)
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
