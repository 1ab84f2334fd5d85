"""img2img and inpainting against diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline.

Same tiny weights, same seeds (rng="torch": each image's generator draws the init image's VAE sample, the
initial noise, then the masked image's VAE sample, as diffusers does). Tolerance: 2/255 on images (max abs),
latent_atol (conftest.py) on final latents. Inpainting is compared inside the mask (diffusers does not paste
back); outside it sdrt's output is the init image, bit for bit. Each comparison has a "can fail" twin (x10 UNet
output gain).
"""

import numpy as np
import pytest
from diffusers_reference import DIFFUSERS_SAMPLERS, LATENT_RTOL
from PIL import Image

PIXEL_TOL = 2  # /255
PROMPT = "a photo of a grey squirrel"
NEGATIVE = "blue sky"
SIZE = 64
STEPS = 8
MASK_BOX = (16, 8, 48, 40)  # repaint x in [16, 48), y in [8, 40): aligned to the 8-pixel latent grid


def init_image(size: int = SIZE) -> Image.Image:
    """A smooth colour test image with one sharp edge, deterministic."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    rgb = np.stack([x, y, 0.5 + 0.4 * np.sin(6 * x * y)], axis=-1)
    rgb[size // 2 :, : size // 3] = (0.9, 0.2, 0.1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


def mask_image(size: int = SIZE) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    x1, y1, x2, y2 = MASK_BOX
    mask[y1:y2, x1:x2] = 255
    return Image.fromarray(mask, "L")


def diffusers_edit(pipe, cls_name, sampler, seeds, output_type="np", **kw):
    """uint8 (B, H, W, 3) images (or (B, C, h, w) latents) from diffusers' img2img / inpaint pipeline class."""
    import diffusers
    import torch

    edit = getattr(diffusers, cls_name)(**pipe.components)
    edit.set_progress_bar_config(disable=True)
    name, overrides = DIFFUSERS_SAMPLERS[sampler]
    config = getattr(pipe, "base_scheduler_config", None) or dict(pipe.scheduler.config)
    pipe.base_scheduler_config = config
    edit.scheduler = getattr(diffusers, name).from_config(config, **overrides)
    out = edit(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=7.0,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        num_images_per_prompt=len(seeds),
        output_type="latent" if output_type == "latent" else "np",
        **kw,
    ).images
    return out.numpy() if output_type == "latent" else (out * 255).round().astype(np.uint8)


def sdrt_edit(pipeline, seeds, output_type="pil", **kw):
    kw = {"sampler": "Euler", "steps": STEPS, "cfg_scale": 7.0, "negative_prompt": NEGATIVE, **kw}
    out = pipeline.generate(PROMPT, seed=seeds[0], batch_size=len(seeds), output_type=output_type, progress=False, **kw)
    return out if output_type == "latent" else np.stack([np.asarray(im) for im in out])


def max_diff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def inside(images):
    x1, y1, x2, y2 = MASK_BOX
    return images[:, y1:y2, x1:x2]


def outside(images):
    keep = np.asarray(mask_image()) == 0
    return images[:, keep]


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DDIM", "DPM++ 2M"])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_img2img_matches_diffusers(tiny_sd, tiny_pipeline, sampler, strength):
    pipe, _ = tiny_sd
    image = init_image()
    want = diffusers_edit(pipe, "StableDiffusionImg2ImgPipeline", sampler, (5,), image=image, strength=strength)
    got = sdrt_edit(tiny_pipeline, [5], sampler=sampler, init_image=image, strength=strength)
    assert got.shape == want.shape
    assert max_diff(got, want) <= PIXEL_TOL


def test_img2img_latents_batch_match_diffusers(tiny_sd, tiny_pipeline, latent_atol):
    pipe, _ = tiny_sd
    image = init_image()
    kw = dict(image=image, strength=0.6)
    want = diffusers_edit(pipe, "StableDiffusionImg2ImgPipeline", "Euler a", (8, 9), output_type="latent", **kw)
    got = sdrt_edit(tiny_pipeline, [8, 9], output_type="latent", sampler="Euler a", init_image=image, strength=0.6)
    np.testing.assert_allclose(got, want, atol=latent_atol, rtol=LATENT_RTOL)


def test_img2img_strength_zero_is_the_vae_round_trip(tiny_pipeline):
    image = init_image()
    out = tiny_pipeline.generate(PROMPT, init_image=image, strength=0.0, seed=3, steps=STEPS, progress=False)[0]
    again = tiny_pipeline.generate(PROMPT, init_image=image, strength=0.0, seed=3, steps=STEPS + 3, progress=False)
    assert out.size == image.size and max_diff(np.asarray(out), np.asarray(again[0])) == 0
    assert "Denoising strength: 0," in out.info["parameters"]


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M"])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpainting_model_matches_diffusers(tiny_inpaint, sampler, strength):
    pipe, pipeline = tiny_inpaint
    image, mask = init_image(), mask_image()
    kw = dict(image=image, mask_image=mask, strength=strength, width=SIZE, height=SIZE)
    want = diffusers_edit(pipe, "StableDiffusionInpaintPipeline", sampler, (4,), **kw)
    got = sdrt_edit(pipeline, [4], sampler=sampler, init_image=image, mask=mask, mask_blur=0, strength=strength)
    assert max_diff(inside(got), inside(want)) <= PIXEL_TOL
    assert max_diff(outside(got), outside(np.asarray(image)[None])) == 0


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DDIM", "DPM++ 2M"])
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_regular_model_inpainting_matches_diffusers(tiny_sd, tiny_pipeline, sampler, strength, latent_atol):
    pipe, _ = tiny_sd
    image, mask = init_image(), mask_image()
    kw = dict(image=image, mask_image=mask, strength=strength, width=SIZE, height=SIZE)
    want = diffusers_edit(pipe, "StableDiffusionInpaintPipeline", sampler, (6,), output_type="latent", **kw)
    got = sdrt_edit(
        tiny_pipeline,
        [6],
        output_type="latent",
        sampler=sampler,
        init_image=image,
        mask=mask,
        mask_blur=0,
        strength=strength,
    )
    np.testing.assert_allclose(got, want, atol=latent_atol, rtol=LATENT_RTOL)
    want = diffusers_edit(pipe, "StableDiffusionInpaintPipeline", sampler, (6,), **kw)
    got = sdrt_edit(tiny_pipeline, [6], sampler=sampler, init_image=image, mask=mask, mask_blur=0, strength=strength)
    assert max_diff(inside(got), inside(want)) <= PIXEL_TOL
    assert max_diff(outside(got), outside(np.asarray(image)[None])) == 0


def test_infotext_records_strength_and_mask_blur(tiny_pipeline, tmp_path):
    from sdrt.runtime.image import save_png

    out = tiny_pipeline.generate(
        PROMPT, init_image=init_image(), mask=mask_image(), strength=0.5, steps=4, seed=1, progress=False
    )[0]
    text = out.info["parameters"]
    assert "Seed resize from" not in text
    assert "Size: 64x64, " in text and ", Denoising strength: 0.5, " in text and ", Mask blur: 4, " in text
    assert text.index("Denoising strength") < text.index("RNG") < text.index("Mask blur") < text.index("Version")
    assert Image.open(save_png(out, tmp_path / "a.png")).info["parameters"] == text


WRONG = {
    "img2img strength": ("img2img", dict(strength=0.6)),
    "img2img sampler": ("img2img", dict(sampler="Euler a")),
    "inpaint model strength": ("inpaint9", dict(strength=0.75)),
    "inpaint model mask": ("inpaint9", dict(mask=mask_image().transpose(Image.Transpose.TRANSPOSE))),
    "regular inpaint without blend": ("inpaint4", dict(mask=None)),
    "regular inpaint strength": ("inpaint4", dict(strength=0.6)),
}


@pytest.mark.parametrize("change", list(WRONG), ids=list(WRONG))
def test_editing_parity_can_fail(tiny_sd, tiny_pipeline, tiny_inpaint, change):
    """The comparisons above catch a wrong strength, sampler, mask, or a missing blend."""
    mode, wrong = WRONG[change]
    image, mask = init_image(), mask_image()
    if mode == "img2img":
        want = diffusers_edit(tiny_sd[0], "StableDiffusionImg2ImgPipeline", "Euler", (5,), image=image, strength=0.75)
        got = sdrt_edit(tiny_pipeline, [5], **{"init_image": image, "strength": 0.75, **wrong})
        assert max_diff(got, want) > 4 * PIXEL_TOL, f"a wrong {change} went unnoticed"
        return
    pipe, pipeline = tiny_inpaint if mode == "inpaint9" else (tiny_sd[0], tiny_pipeline)
    kw = dict(image=image, mask_image=mask, strength=1.0, width=SIZE, height=SIZE)
    want = diffusers_edit(pipe, "StableDiffusionInpaintPipeline", "Euler", (4,), **kw)
    got = sdrt_edit(pipeline, [4], **{"init_image": image, "mask": mask, "mask_blur": 0, "strength": 1.0, **wrong})
    assert max_diff(inside(got), inside(want)) > 4 * PIXEL_TOL, f"a wrong {change} went unnoticed"
