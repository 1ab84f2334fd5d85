"""SDXL: sdrt's images against diffusers' StableDiffusionXLPipeline, ...Img2ImgPipeline, ...InpaintPipeline and the
base + refiner handoff (denoising_end / denoising_start), on tiny random SDXL models with the same weights and seeds.

Tolerance: images within 2/255 (max abs over all pixels), as test_parity.py. The tiny UNets' outputs have a x10
gain, so a wrong second prompt, micro-conditioning, aesthetic score, switch point or pooled embedding moves the
images by far more (test_sdxl_parity_can_fail shows it for each).
"""

import numpy as np
import pytest
from diffusers_reference import DIFFUSERS_SAMPLERS, diffusers_run
from PIL import Image
from test_parity import PIXEL_TOL, max_diff

from sdrt import Pipeline

PROMPT = "a photo of a grey squirrel"
PROMPT_2 = "a red cat in the blue sky"
NEGATIVE = "blue sky"


@pytest.fixture(scope="module")
def base(tiny_sdxl, backend):
    return tiny_sdxl["base"][0], Pipeline.load(tiny_sdxl["base"][1], backend=backend)


@pytest.fixture(scope="module")
def refiner(tiny_sdxl, backend):
    return tiny_sdxl["refiner"][0], Pipeline.load(tiny_sdxl["refiner"][1], backend=backend)


def sdrt_images(pipeline, seeds, **kw):
    out = pipeline.generate(PROMPT, seed=seeds[0], batch_size=len(seeds), progress=False, **kw)
    return out if kw.get("output_type") == "latent" else np.stack([np.asarray(im) for im in out])


def init_image(width=64, height=64) -> Image.Image:
    """A smooth colour ramp: img2img output depends on it."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height) + 64], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize(
    ("sampler", "scheduler", "width", "height", "seeds", "cfg_scale", "negative"),
    [
        ("Euler", "automatic", 64, 64, (7,), 5.0, NEGATIVE),
        ("Euler a", "automatic", 80, 64, (3, 4), 6.0, ""),
        ("DPM++ 2M", "karras", 64, 64, (7,), 5.0, NEGATIVE),
        ("DDIM", "automatic", 64, 72, (11,), 1.0, ""),
        ("DPM++ 2M", "automatic", 64, 72, (11,), 1.0, ""),
    ],
    ids=["euler-cfg", "euler_a-wide-b2-zeroed-negative", "dpm2m_karras-cfg", "ddim-nocfg", "dpm2m-nocfg"],
)
def test_txt2img_matches_diffusers(base, sampler, scheduler, width, height, seeds, cfg_scale, negative):
    pipe, pipeline = base
    kw = dict(
        negative_prompt=negative,
        width=width,
        height=height,
        steps=8,
        cfg_scale=cfg_scale,
        sampler=sampler,
        scheduler=scheduler,
    )
    want = diffusers_run(pipe, PROMPT, seeds=seeds, **kw)
    got = sdrt_images(pipeline, seeds, **kw)
    assert got.shape == want.shape
    assert max_diff(got, want) <= PIXEL_TOL


MICRO = dict(
    original_size=(128, 96),
    crops_coords_top_left=(8, 16),
    target_size=(64, 64),
    negative_original_size=(32, 32),
    negative_crops_coords_top_left=(8, 16),
    negative_target_size=(48, 64),
)


@pytest.mark.parametrize(
    "extra",
    [dict(prompt_2=PROMPT_2, negative_prompt_2="a dog"), MICRO],
    ids=["prompt_2", "micro-conditioning"],
)
def test_second_prompt_and_micro_conditioning_match_diffusers(base, extra):
    pipe, pipeline = base
    kw = dict(negative_prompt=NEGATIVE, width=64, height=64, steps=6, cfg_scale=5.0, sampler="Euler")
    want = diffusers_run(pipe, PROMPT, seeds=(5,), **kw, **extra)
    got = sdrt_images(pipeline, [5], **kw, **extra)
    assert max_diff(got, want) <= PIXEL_TOL


def diffusers_call(pipe, seeds, sampler="Euler", scheduler="automatic", generators=None, output_type="np", **call):
    """uint8 (B, H, W, 3) images (or latents) from any diffusers SDXL pipeline, its scheduler swapped for SAMPLER's
    class as diffusers_run does; GENERATORS (one per seed) can be shared between calls."""
    import diffusers
    import torch

    cls_name, overrides = DIFFUSERS_SAMPLERS[sampler]
    if scheduler == "karras":
        overrides = {**overrides, "use_karras_sigmas": True}
    if not hasattr(pipe, "base_scheduler_config"):
        pipe.base_scheduler_config = dict(pipe.scheduler.config)
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.base_scheduler_config, **overrides)
    generators = generators or [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(PROMPT, generator=generators, num_images_per_prompt=len(seeds), output_type=output_type, **call).images
    return out if output_type == "latent" else (out * 255).round().astype(np.uint8)


def diffusers_kwargs(negative_prompt="", steps=8, cfg_scale=5.0, **rest) -> dict:
    """sdrt's option names as diffusers' call arguments (an empty negative prompt: None, zeroed by the base)."""
    return dict(negative_prompt=negative_prompt or None, num_inference_steps=steps, guidance_scale=cfg_scale, **rest)


@pytest.fixture(scope="module")
def base_img2img(base):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(**base[0].components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("sampler", "strength"), [("Euler a", 0.75), ("DPM++ 2M", 0.6)])
def test_img2img_matches_diffusers(base, base_img2img, sampler, strength):
    """The base model through StableDiffusionXLImg2ImgPipeline (diffusers' SDXL img2img)."""
    image = init_image()
    kw = dict(negative_prompt=NEGATIVE, steps=8, cfg_scale=5.0)
    want = diffusers_call(base_img2img, (2, 3), sampler, image=image, strength=strength, **diffusers_kwargs(**kw))
    got = sdrt_images(base[1], [2, 3], sampler=sampler, init_image=image, strength=strength, **kw)
    assert max_diff(got, want) <= PIXEL_TOL


@pytest.mark.parametrize(("sampler", "strength"), [("Euler a", 0.6), ("DPM++ 2M", 1.0)])
def test_inpainting_matches_diffusers(base, sampler, strength):
    """The base model (4-channel UNet: the latents outside the mask are replaced after every step) through
    StableDiffusionXLInpaintPipeline, compared inside the mask (diffusers does not paste back), mask on the
    8-pixel grid and mask_blur 0, as test_parity_editing.py does for SD 1.x."""
    from diffusers import StableDiffusionXLInpaintPipeline
    from test_parity_editing import init_image as edit_image
    from test_parity_editing import inside, mask_image

    inpaint = StableDiffusionXLInpaintPipeline(**base[0].components)
    inpaint.set_progress_bar_config(disable=True)
    kw = dict(negative_prompt=NEGATIVE, steps=8, cfg_scale=5.0)
    edit = dict(image=edit_image(), mask_image=mask_image(), strength=strength, width=64, height=64)
    want = diffusers_call(inpaint, (2,), sampler, **edit, **diffusers_kwargs(**kw))
    got = sdrt_images(
        base[1], [2], sampler=sampler, init_image=edit_image(), mask=mask_image(), mask_blur=0, strength=strength, **kw
    )
    assert max_diff(inside(got), inside(want)) <= PIXEL_TOL


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory, backend):
    """A tiny SDXL inpainting model (9-channel UNet: latents, mask, masked-image latents), exported."""
    from tiny_sdxl import build_tiny_sdxl

    from sdrt.cli import main

    root = tmp_path_factory.mktemp("sdxl_inpainting")
    pipe = build_tiny_sdxl(root / "diffusers", seed=3, unet_in_channels=9)
    assert main(["export", str(root / "diffusers"), "-o", str(root / "onnx")]) == 0
    return pipe, Pipeline.load(root / "onnx", backend=backend)


@pytest.mark.parametrize(("sampler", "strength"), [("Euler a", 0.6), ("Euler", 1.0)])
def test_inpainting_model_matches_diffusers(inpainting_model, sampler, strength):
    """A 9-channel SDXL inpainting UNet through StableDiffusionXLInpaintPipeline, inside the mask."""
    from diffusers import StableDiffusionXLInpaintPipeline
    from test_parity_editing import init_image as edit_image
    from test_parity_editing import inside, mask_image

    pipe, pipeline = inpainting_model
    assert pipeline.manifest.detected["variant"]["value"] == "inpainting"
    inpaint = StableDiffusionXLInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    kw = dict(negative_prompt=NEGATIVE, steps=8, cfg_scale=5.0)
    edit = dict(image=edit_image(), mask_image=mask_image(), strength=strength, width=64, height=64)
    want = diffusers_call(inpaint, (2,), sampler, **edit, **diffusers_kwargs(**kw))
    got = sdrt_images(
        pipeline, [2], sampler=sampler, init_image=edit_image(), mask=mask_image(), mask_blur=0, strength=strength, **kw
    )
    assert max_diff(inside(got), inside(want)) <= PIXEL_TOL


def diffusers_refined(base_pipe, refiner_pipe, seeds, switch_at, sampler, scheduler, width=64, height=64, **kw):
    """diffusers' base + refiner: the base up to denoising_end (latents out), the refiner from denoising_start,
    each image's generator shared by both calls. uint8 (B, H, W, 3)."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    call = diffusers_kwargs(**kw)
    latents = diffusers_call(
        base_pipe, seeds, sampler, scheduler, generators, "latent", width=width, height=height,
        denoising_end=switch_at, **call,
    )  # fmt: skip
    return diffusers_call(refiner_pipe, seeds, sampler, scheduler, generators, image=latents,
                          denoising_start=switch_at, **call)  # fmt: skip


@pytest.mark.parametrize(
    ("sampler", "scheduler", "switch_at", "cfg_scale"),
    [
        ("Euler a", "automatic", 0.8, 5.0),
        ("DPM++ 2M", "automatic", 0.7, 5.0),
        ("DPM++ 2M", "karras", 0.8, 1.0),
    ],
)
def test_refiner_handoff_matches_diffusers(base, refiner, tiny_sdxl, sampler, scheduler, switch_at, cfg_scale):
    kw = dict(negative_prompt=NEGATIVE, width=64, height=64, steps=10, cfg_scale=cfg_scale)
    want = diffusers_refined(base[0], refiner[0], (4, 5), switch_at, sampler, scheduler, **kw)
    got = sdrt_images(
        base[1],
        [4, 5],
        sampler=sampler,
        scheduler=scheduler,
        refiner=tiny_sdxl["refiner"][1],
        refiner_switch_at=switch_at,
        **kw,
    )
    assert max_diff(got, want) <= PIXEL_TOL


@pytest.mark.parametrize("wrong", [None, dict(aesthetic_score=1.0), dict(negative_aesthetic_score=9.0)])
def test_refiner_img2img_matches_diffusers(refiner, wrong):
    """The refiner alone on an image, with aesthetic-score conditioning (StableDiffusionXLImg2ImgPipeline); a wrong
    score moves the images past the tolerance."""
    image = init_image()
    kw = dict(negative_prompt=NEGATIVE, steps=8, cfg_scale=5.0)
    extra = dict(aesthetic_score=7.0, negative_aesthetic_score=2.0)
    want = diffusers_call(refiner[0], (6,), image=image, strength=0.6, **diffusers_kwargs(**kw), **extra)
    got = sdrt_images(refiner[1], [6], init_image=image, strength=0.6, sampler="Euler", **kw, **extra | (wrong or {}))
    if wrong is None:
        assert max_diff(got, want) <= PIXEL_TOL
    else:
        assert max_diff(got, want) > 4 * PIXEL_TOL, f"a wrong {wrong} went unnoticed"


@pytest.fixture(scope="module")
def turbo(tiny_sdxl, tmp_path_factory, backend):
    """The tiny base with SDXL-Turbo's scheduler config (Euler ancestral, trailing spacing), in diffusers and in
    sdrt (the exported base, its model.json's scheduler replaced: Turbo is SDXL's architecture)."""
    import json
    import shutil
    from dataclasses import asdict

    from diffusers import StableDiffusionXLPipeline
    from tiny_sdxl import SDXL_TURBO_SCHEDULER

    from sdrt.export import scheduler_config

    pipe = StableDiffusionXLPipeline(**tiny_sdxl["base"][0].components)
    pipe.scheduler = pipe.scheduler.from_config(SDXL_TURBO_SCHEDULER)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("turbo") / "onnx"
    shutil.copytree(tiny_sdxl["base"][1], folder)
    manifest = json.loads((folder / "model.json").read_text())
    manifest["scheduler"] = asdict(scheduler_config(pipe.scheduler.config))
    (folder / "model.json").write_text(json.dumps(manifest))
    return pipe, Pipeline.load(folder, backend=backend)


@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_matches_diffusers(turbo, steps):
    """SDXL-Turbo's recipe: 1 to 4 steps of Euler a, no guidance (cfg 0), trailing timesteps from its config."""
    pipe, pipeline = turbo
    kw = dict(width=64, height=64, steps=steps, cfg_scale=0.0, sampler="Euler a")
    want = diffusers_run(pipe, PROMPT, seeds=(8,), **kw)
    got = sdrt_images(pipeline, [8], **kw)
    assert max_diff(got, want) <= PIXEL_TOL


WRONG = {
    "prompt_2": dict(prompt_2=PROMPT_2),
    "original_size": dict(original_size=(512, 512)),
    "crop": dict(crops_coords_top_left=(256, 128)),
    "negative target size": dict(negative_target_size=(16, 16)),
}


@pytest.mark.parametrize("change", list(WRONG), ids=list(WRONG))
def test_sdxl_parity_can_fail(base, change):
    """A wrong second prompt or micro-conditioning number moves the images past the tolerance."""
    pipe, pipeline = base
    kw = dict(negative_prompt=NEGATIVE, width=64, height=64, steps=6, cfg_scale=5.0, sampler="Euler")
    want = diffusers_run(pipe, PROMPT, seeds=(5,), **kw)
    got = sdrt_images(pipeline, [5], **kw, **WRONG[change])
    assert max_diff(got, want) > 4 * PIXEL_TOL, f"a wrong {change} went unnoticed"


@pytest.mark.parametrize(
    "change",
    [dict(refiner_switch_at=0.6), dict(refiner=None)],
    ids=["switch point", "no refiner"],
)
def test_refiner_parity_can_fail(base, refiner, tiny_sdxl, change):
    kw = dict(negative_prompt=NEGATIVE, width=64, height=64, steps=10, cfg_scale=5.0)
    want = diffusers_refined(base[0], refiner[0], (4,), 0.8, "Euler", "automatic", **kw)
    options = dict(refiner=tiny_sdxl["refiner"][1], refiner_switch_at=0.8) | change
    if options["refiner"] is None:
        options.pop("refiner_switch_at")
    got = sdrt_images(base[1], [4], sampler="Euler", **kw, **options)
    assert max_diff(got, want) > 4 * PIXEL_TOL, f"a wrong {change} went unnoticed"
