"""img2img and inpainting: the init image and mask prepared as the sampler needs them, the start of sampling from
them, and the per-step blend of regular (4-channel) UNets inpainting. Masks: 1 (or 255) = repaint."""

import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdrt.errors import InvalidOption, check_int
from sdrt.runtime import masks
from sdrt.runtime.image import from_pil
from sdrt.runtime.rng import ImageNoise
from sdrt.runtime.schedules import Schedule


@dataclass(frozen=True)
class Edit:
    """img2img / inpainting inputs at the generated size."""

    image: np.ndarray | None  # (1, 3, H, W) float32 in [-1, 1]: the (filled) init image the VAE encodes (None: latents)
    latent_mask: np.ndarray | None = None  # (1, 1, h, w) float32 0/1: where the sampler's result is kept
    conditioning_mask: np.ndarray | None = None  # (1, 1, h, w) float32 0/1: inpainting UNets' mask channel
    masked_image: np.ndarray | None = None  # (1, 3, H, W) float32: init image with the repainted area at 0
    fill: str = "original"  # A1111's inpainting_fill
    original: Image.Image | None = None  # what the result is pasted onto
    overlay: Image.Image | None = None  # L mask of the paste-back (None: no paste-back)
    paste_box: tuple[int, int, int, int] | None = None  # (x, y, w, h) with inpaint_full_res


def inpainting_unet(manifest) -> bool:
    """A 9-channel UNet: latents, mask and masked-image latents."""
    return manifest.unet_in_channels != manifest.latent_channels


def prepare_edit(manifest, opts) -> Edit:
    """The init image and mask as the sampler needs them (A1111's StableDiffusionProcessingImg2Img.init order:
    invert, blur, crop for "only masked" or resize, fill), and what the paste-back needs."""
    image, mask, resize_mode, full_res = opts.init_image, opts.mask, opts.resize_mode, opts.inpaint_full_res
    if image is None:  # img2img from init_latents (hires fix's second pass): sample() gets them as its start
        return Edit(image=None)
    size = (opts.width, opts.height)
    if mask is None and not inpainting_unet(manifest):
        return Edit(image=from_pil(masks.resize_image(image, *size, resize_mode)))
    if mask is None:  # an inpainting UNet without a mask repaints everything (A1111's img2img conditioning)
        pixel_mask, overlay = Image.new("L", image.size, 255), None
    else:
        pixel_mask, notes = masks.load_mask(mask, image.size)
        for note in notes:
            warnings.warn(note, stacklevel=3)
        if opts.inpainting_mask_invert:
            pixel_mask = masks.invert_mask(pixel_mask)
        masks.check_mask_not_empty(pixel_mask)
        if opts.mask_blur:
            pixel_mask = masks.blur_mask(pixel_mask, opts.mask_blur)
        overlay = pixel_mask if full_res else masks.overlay_mask(pixel_mask)
    original, paste_box = image, None
    if full_res:
        if mask is None:
            raise InvalidOption("inpaint_full_res", full_res, "False without a mask")
        padding = check_int("inpaint_full_res_padding", opts.inpaint_full_res_padding, 0, max(image.size))
        image, pixel_mask, paste_box = masks.crop_for_inpaint(image, pixel_mask, *size, padding)
    else:
        image = masks.resize_image(image, *size, resize_mode)
        pixel_mask = masks.resize_image(pixel_mask, *size, resize_mode)
        if overlay is not None:
            original, overlay = image, masks.resize_image(overlay, *size, resize_mode)
    image = masks.fill_init_image(image, pixel_mask, opts.inpainting_fill)
    step = manifest.latent_downsample
    repaint = (np.asarray(pixel_mask, dtype=np.float32) / 255 >= 0.5).astype(np.float32)  # (H, W), binarised
    pixels = from_pil(image)  # (1, 3, H, W) float32 in [-1, 1]
    return Edit(
        image=pixels,
        latent_mask=masks.latent_mask(pixel_mask, opts.width // step, opts.height // step),
        conditioning_mask=repaint[None, None, ::step, ::step],  # nearest, as torch's interpolate
        masked_image=(pixels * (1 - repaint)).astype(np.float32),  # masked area grey (0)
        fill=opts.inpainting_fill,
        original=original,
        overlay=overlay,
        paste_box=paste_box,
    )


def start_edit(manifest, vae, opts, schedule: Schedule, edit: Edit, noise: ImageNoise, batch: int, add_noise,
               latents=None):  # fmt: skip
    """(schedule cut to the steps run, starting x, UNet conditioning, blend state) of img2img / inpainting.
    ADD_NOISE(x0, eps, sigma): the family's forward process (Family.add_noise). LATENTS (B, C, h, w): the clean
    latents to start from instead of the init image's (init_latents, no draw for them).

    Each image's generator draws in diffusers' order (StableDiffusionImg2ImgPipeline / InpaintPipeline
    prepare_latents, then prepare_mask_latents): init image latents, initial noise, masked-image latents.
    """
    inpaint_unet = inpainting_unet(manifest)
    inpainting = edit.latent_mask is not None
    first = len(schedule.timesteps) - opts.steps_run
    cut = Schedule(schedule.sigmas[first:], schedule.timesteps[first:], schedule.initial_noise_scale)
    pure_noise = inpainting and opts.strength == 1.0  # diffusers' inpaint starts from noise alone at strength 1
    x0 = None if inpaint_unet and pure_noise else vae.encode(edit.image, noise) if latents is None else latents
    eps = noise.initial()  # (B, C, h, w) float32
    if x0 is not None and inpainting and edit.fill in ("latent noise", "latent nothing"):
        x0 = masks.fill_init_latents(x0, edit.latent_mask, edit.fill, eps)
    if pure_noise:
        x = eps * np.float32(cut.initial_noise_scale)
    elif opts.steps_run == 0:  # strength 0 (or steps * strength < 1): the init image through the VAE
        x = x0 / np.float32(cut.final_scale)
    else:  # the family's forward process at the first sigma run (x0 + sigma eps for the UNet families)
        x = add_noise(x0, eps, cut.sigmas[0])
    conditioning = None
    if inpaint_unet:
        masked = vae.encode(edit.masked_image, noise)  # (B, C, h, w)
        conditioning = np.concatenate([np.repeat(edit.conditioning_mask, batch, axis=0), masked], axis=1)
    elif inpainting:  # diffusers samples the masked image's latents with regular UNets too, unused: skip a draw
        noise()
    blend = (x0, eps, edit.latent_mask, add_noise) if inpainting and not inpaint_unet else None
    return cut, x.astype(np.float32), conditioning, blend


def blend_known(x: np.ndarray, blend, schedule: Schedule, i: int, last: int) -> None:
    """StableDiffusionInpaintPipeline's blend for regular UNets: after step i, x outside the mask is replaced in
    place by the init latents noised to sigmas[i + 1] with the initial noise (clean after the LAST step)."""
    x0, eps, mask, add_noise = blend  # (B, C, h, w), (B, C, h, w), (1, 1, h, w), Family.add_noise
    if i == last:
        known = x0 / np.float32(schedule.final_scale)
    else:
        known = add_noise(x0, eps, schedule.sigmas[i + 1])
    np.copyto(x, (1 - mask) * known + mask * x)


def paste_back(images: list, edit: Edit | None) -> list:
    """A1111's apply_overlay of each image onto the original, where the edit has an overlay."""
    if edit is None or edit.overlay is None:
        return images
    return [masks.paste_back(im, edit.original, edit.overlay, edit.paste_box) for im in images]
