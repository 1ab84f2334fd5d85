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

from dataclasses import replace

import numpy as np
from PIL import Image

from sdrt.errors import Interrupted
from sdrt.runtime.hires_options import LATENT_MODES, HiresPlan, plan
from sdrt.runtime.resample import interpolate
from sdrt.runtime.vae_swap import vae_infotext


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


def upscale_latents(pipe, latents: np.ndarray, p: HiresPlan, vae_file=None) -> np.ndarray:
    """(N, C, h, w) first-pass latents -> (N, C, H/8, W/8) latents of the second pass, cropped as A1111 does; an image
    upscaler's round trip through the model's VAE, or VAE_FILE's (sd_vae: vae_swap.py)."""
    step = pipe.manifest.latent_downsample
    size = (p.upscale_to[1] // step, p.upscale_to[0] // step)  # (rows, cols)
    if p.upscaler in LATENT_MODES:
        mode, antialias = LATENT_MODES[p.upscaler]
        up = interpolate(latents, size, mode, antialias)
    else:
        vae = pipe.vae.using(vae_file)
        up = np.concatenate([_encode(pipe, vae, _upscaled_image(pipe, vae, z, p), size) for z in latents])
    tx, ty = p.truncate
    return np.ascontiguousarray(up[:, :, ty // 2 : up.shape[2] - (ty + 1) // 2, tx // 2 : up.shape[3] - (tx + 1) // 2])


def _upscaled_image(pipe, vae, z: np.ndarray, p: HiresPlan):
    """One latent (C, h, w) decoded to an 8-bit image as A1111's sample_hr_pass makes it (255 * value, truncated),
    then resized to upscale_to by the upscaler (images.resize_image)."""
    unit = np.clip((vae.decode(z[None])[0] + 1) / 2, 0, 1).transpose(1, 2, 0)  # (H, W, 3) in [0, 1]
    image = Image.fromarray((unit * 255).astype(np.uint8), "RGB")
    return pipe.upscalers.resize(image, *p.upscale_to, p.upscaler)


def _encode(pipe, vae, image, size) -> np.ndarray:
    """IMAGE cut to SIZE * 8 pixels from its top left (the VAE encoder drops what does not fill a latent) -> its
    posterior mean (1, C, h, w)."""
    step = pipe.manifest.latent_downsample
    pixels = np.asarray(image.crop((0, 0, size[1] * step, size[0] * step)), dtype=np.float32) / 127.5 - 1
    pixels = pixels.transpose(2, 0, 1)[None]  # (1, 3, H, W) in [-1, 1]
    latent_shape = (1, pipe.manifest.latent_channels, *size)
    return vae.encode(pixels, lambda: np.zeros(latent_shape, np.float32))


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
    latents = upscale_latents(pipe, latents[: done * opts.batch_size], p, opts.vae_file)
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

    seed, subseed, model = opts.seeds[i], opts.subseeds[i], pipe.model_infotext() | vae_infotext(opts)
    own = parse_infotext(write_infotext(second, seed, subseed, model, {}))
    notes = {k: v for k, v in parse_infotext(text).items() if k not in own}
    for key in [k for k in notes if k.endswith("-1") and k[:-2] + "-2" in notes]:  # "AxB" values parse in two
        notes[key[:-2]] = f"{notes.pop(key)}x{notes.pop(key[:-2] + '-2')}"
    return write_infotext(opts, seed, subseed, model, notes)
