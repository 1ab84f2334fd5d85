"""Hires fix against a reference built from diffusers: txt2img latents (StableDiffusionPipeline) -> the same latent
interpolation in torch -> StableDiffusionImg2ImgPipeline from those latents, with A1111's noise (a fresh generator
of the image's seed at the hires size) and A1111's step count (hires steps of a schedule of int(steps / strength)).
Tolerance 2/255 on images; each comparison has a can-fail twin. Plus A1111's sizes, the infotext both ways, and
bad input."""

import numpy as np
import pytest
from diffusers_reference import DIFFUSERS_SAMPLERS
from PIL import Image

from sdrt.errors import InvalidOption
from sdrt.runtime.hires_options import plan
from sdrt.runtime.infotext import generate_kwargs, parse_infotext
from sdrt.runtime.options import make_options

PIXEL_TOL = 2  # /255
PROMPT, NEGATIVE = "a photo of a grey squirrel", "blue sky"
SIZE, STEPS = 64, 6


def _scheduler(pipe, sampler):
    import diffusers

    name, overrides = DIFFUSERS_SAMPLERS[sampler]
    return getattr(diffusers, name).from_config(dict(pipe.scheduler.config), **overrides)


def diffusers_hires(pipe, seed, mode="bilinear", antialias=False, scale=2, strength=0.6, hr_steps=4,
                    sampler="Euler", hr_prompt=PROMPT):  # fmt: skip
    """uint8 (H, W, 3): diffusers txt2img latents, F.interpolate, then img2img from those latents."""
    import diffusers
    import torch

    txt2img = diffusers.StableDiffusionPipeline(**pipe.components)
    txt2img.scheduler = _scheduler(pipe, sampler)
    txt2img.set_progress_bar_config(disable=True)
    kw = dict(negative_prompt=NEGATIVE, guidance_scale=7.0)
    latents = txt2img(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent",
                      generator=torch.Generator("cpu").manual_seed(seed), **kw).images  # fmt: skip
    side = SIZE * scale // 8
    up = torch.nn.functional.interpolate(latents, size=(side, side), mode=mode, antialias=antialias)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.scheduler = _scheduler(pipe, sampler)
    img2img.set_progress_bar_config(disable=True)
    total = int(hr_steps / min(strength, 0.999))  # A1111's setup_img2img_steps
    out = img2img(hr_prompt, image=up, strength=(hr_steps + 0.5) / total, num_inference_steps=total,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw).images  # fmt: skip
    return (out[0] * 255).round().astype(np.uint8)


def sdrt_hires(pipeline, seed, **kw):
    kw = {"hires": True, "hires_steps": 4, "strength": 0.6, "sampler": "Euler", **kw}
    out = pipeline.generate(PROMPT, negative_prompt=NEGATIVE, seed=seed, steps=STEPS, width=SIZE, height=SIZE,
                            cfg_scale=7.0, progress=False, **kw)  # fmt: skip
    return out


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16)).max())


@pytest.mark.parametrize(
    "upscaler, mode, antialias",
    [("Latent", "bilinear", False), ("Latent (bicubic antialiased)", "bicubic", True),
     ("Latent (nearest-exact)", "nearest-exact", False)],
)  # fmt: skip
def test_latent_hires_matches_diffusers(tiny_sd, tiny_pipeline, upscaler, mode, antialias):
    pipe, _ = tiny_sd
    want = diffusers_hires(pipe, 5, mode, antialias)
    got = sdrt_hires(tiny_pipeline, 5, hires_upscaler=upscaler)[0]
    assert got.size == (2 * SIZE, 2 * SIZE)
    assert max_diff(got, want) <= PIXEL_TOL


def test_wrong_interpolation_or_strength_fails(tiny_sd, tiny_pipeline):
    """Can-fail twins: the reference with nearest instead of bilinear, or strength 0.8 instead of 0.6."""
    pipe, _ = tiny_sd
    got = sdrt_hires(tiny_pipeline, 5, hires_upscaler="Latent")[0]
    assert max_diff(got, diffusers_hires(pipe, 5, "nearest")) > 4 * PIXEL_TOL
    assert max_diff(got, diffusers_hires(pipe, 5, strength=0.8)) > 4 * PIXEL_TOL


def test_hires_sampler_and_prompt_match_diffusers(tiny_sd, tiny_pipeline):
    pipe, _ = tiny_sd
    want = diffusers_hires(pipe, 7, sampler="Euler a", hr_prompt="a red fox", strength=0.45, hr_steps=3)
    got = sdrt_hires(tiny_pipeline, 7, sampler="Euler a", hires_prompt="a red fox", strength=0.45, hires_steps=3)
    assert max_diff(got[0], want) <= PIXEL_TOL
    assert "Hires prompt: a red fox" in got[0].info["parameters"]


def test_image_upscaler_hires_runs(tiny_pipeline):
    out = sdrt_hires(tiny_pipeline, 3, hires_upscaler="Lanczos", hires_resize_x=100, hires_resize_y=120, batch_size=2)
    assert [im.size for im in out] == [(104, 120)] * 2  # A1111: 120 x 120, 2 latent columns cut -> 104 x 120
    with pytest.raises(InvalidOption, match="hires_upscaler.*None, Lanczos, Nearest"):
        sdrt_hires(tiny_pipeline, 3, hires_upscaler="4x-UltraSharp")


def test_a1111_target_sizes(tiny_sd):
    from sdrt.runtime.manifest import Manifest

    manifest = Manifest.load(tiny_sd[1])

    def size(**kw):
        return plan(make_options(manifest, hires=True, width=64, height=96, **kw)).size

    assert size(hires_scale=1.5) == (96, 144)
    assert size(hires_resize_x=128) == (128, 192)
    assert size(hires_resize_y=128) == (80, 128)  # 128 * 64 // 96 = 85 -> 10 latent columns
    assert size(hires_resize_x=128, hires_resize_y=128) == (128, 128)  # 128 x 192, 8 latent rows cut


def test_infotext_round_trip(tiny_pipeline):
    out = sdrt_hires(tiny_pipeline, 11, hires_scale=1.5, hires_upscaler="Latent (nearest)", hires_cfg=5.0,
                     hires_sampler="DPM++ 2M", hires_scheduler="karras")  # fmt: skip
    text = out[0].info["parameters"]
    for entry in ("Size: 64x64", "Denoising strength: 0.6", "Hires upscale: 1.5", "Hires steps: 4",
                  "Hires upscaler: Latent (nearest)", "Hires sampler: DPM++ 2M", "Hires schedule type: Karras",
                  "Hires CFG Scale: 5"):  # fmt: skip
        assert entry in text
    kwargs = generate_kwargs(parse_infotext(text))
    assert kwargs["hires"] is True and kwargs["hires_scale"] == 1.5 and kwargs["strength"] == 0.6
    again = tiny_pipeline.generate(**kwargs, progress=False)[0]
    assert max_diff(again, out[0]) == 0 and again.info["parameters"] == text


@pytest.mark.parametrize(
    "kw, field",
    [({"hires_scale": 20}, "hires_scale"), ({"hires_resize_x": 100000}, "hires_resize_x"),
     ({"hires_sampler": "Bogus"}, "sampler"), ({"strength": 0.001}, "strength")],
)  # fmt: skip
def test_bad_hires_options(tiny_pipeline, kw, field):
    with pytest.raises(InvalidOption, match=field):
        sdrt_hires(tiny_pipeline, 1, **kw)


def test_sdxl_hires(tiny_sdxl):
    from sdrt import Pipeline

    pipe = Pipeline.load(tiny_sdxl["base"][1])
    out = pipe.generate(PROMPT, width=64, height=64, steps=3, seed=2, hires=True, hires_scale=1.5, strength=0.5,
                        progress=False)  # fmt: skip
    assert out[0].size == (96, 96) and "Hires upscale: 1.5" in out[0].info["parameters"]
    with pytest.raises(InvalidOption, match="refiner"):
        pipe.generate(PROMPT, steps=3, hires=True, refiner=str(tiny_sdxl["refiner"][1]), progress=False)


def test_controlnet_units_apply_to_both_passes(tiny_controlnets):
    """The unit's control map is made at each pass's size (the extension's hires behaviour): the maps returned with
    the images are the second pass's."""
    from sdrt import Pipeline
    from sdrt.runtime.controlnet import ControlNetUnit

    _, model, nets = tiny_controlnets
    pipe = Pipeline.load(model)
    image = np.zeros((64, 64, 3), np.uint8)
    image[20:40, 10:50] = 255
    unit = ControlNetUnit(nets[0][1], Image.fromarray(image))
    plain = pipe.generate(PROMPT, width=SIZE, height=SIZE, steps=3, seed=1, hires=True, strength=0.5, progress=False)
    out = pipe.generate(PROMPT, width=SIZE, height=SIZE, steps=3, seed=1, hires=True, strength=0.5, progress=False,
                        controlnets=[unit], control_maps=True)  # fmt: skip
    assert [im.size for im in out] == [(128, 128), (128, 128)]  # the image and the second pass's control map
    assert max_diff(out[0], plain[0]) > 0  # the unit changed the image
    assert "ControlNet 0" in out[0].info["parameters"]


def test_progress_counts_both_passes_and_interrupt_keeps_finished_batches(tiny_pipeline):
    from sdrt.errors import Interrupted

    seen = []

    def record(step, total, denoised):
        seen.append((step, total))

    out = sdrt_hires(tiny_pipeline, 2, hires_steps=3, batch_count=2, callback=record)
    assert len(out) == 2 and seen[-1] == (2 * (STEPS + 3), 2 * (STEPS + 3))
    assert [s for s, _ in seen] == list(range(1, 2 * (STEPS + 3) + 1))

    def stop_in_second_batch(step, total, denoised):
        if step == STEPS + 1:  # the first step of the second batch's first pass
            raise Interrupted()

    out = sdrt_hires(tiny_pipeline, 2, hires_steps=3, batch_count=2, callback=stop_in_second_batch)
    assert [im.size for im in out] == [(2 * SIZE, 2 * SIZE)]  # the finished batch, with its second pass


def diffusers_hires_lanczos(pipe, seed, strength=0.6, hr_steps=4, truncate=True):
    """uint8 (H, W, 3): diffusers txt2img latents, decoded to 8 bits as A1111 (truncated), Lanczos x2 (PIL), the
    VAE posterior's mean, then img2img from those latents."""
    import diffusers
    import torch
    from PIL import Image

    txt2img = diffusers.StableDiffusionPipeline(**pipe.components)
    txt2img.scheduler = _scheduler(pipe, "Euler")
    txt2img.set_progress_bar_config(disable=True)
    kw = dict(negative_prompt=NEGATIVE, guidance_scale=7.0)
    latents = txt2img(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent",
                      generator=torch.Generator("cpu").manual_seed(seed), **kw).images  # fmt: skip
    vae, scaling = pipe.vae, pipe.vae.config.scaling_factor
    with torch.no_grad():
        unit = ((vae.decode(latents / scaling).sample[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy() * 255
        low = Image.fromarray(unit.astype(np.uint8) if truncate else unit.round().astype(np.uint8))
        big = np.asarray(low.resize((2 * SIZE, 2 * SIZE), Image.LANCZOS), dtype=np.float32) / 127.5 - 1
        up = vae.encode(torch.from_numpy(big).permute(2, 0, 1)[None]).latent_dist.mean * scaling
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.scheduler = _scheduler(pipe, "Euler")
    img2img.set_progress_bar_config(disable=True)
    total = int(hr_steps / min(strength, 0.999))
    out = img2img(PROMPT, image=up, strength=(hr_steps + 0.5) / total, num_inference_steps=total,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw).images  # fmt: skip
    return (out[0] * 255).round().astype(np.uint8)


def test_image_upscaler_hires_matches_diffusers(tiny_sd, tiny_pipeline):
    """The image path (decode, Lanczos, VAE encode to the posterior mean, img2img) within 2/255; can-fail twin:
    strength 0.8 in the reference."""
    pipe, _ = tiny_sd
    got = sdrt_hires(tiny_pipeline, 9, hires_upscaler="Lanczos")[0]
    assert max_diff(got, diffusers_hires_lanczos(pipe, 9)) <= PIXEL_TOL
    assert max_diff(got, diffusers_hires_lanczos(pipe, 9, strength=0.8)) > 4 * PIXEL_TOL
