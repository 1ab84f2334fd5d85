"""SD 3.5 through sdrt's Pipeline against diffusers' StableDiffusion3 pipelines on the same weights and seeds:
txt2img, batch, img2img, inpainting, Heun, without T5; within 2/255 on images (latent_atol on inpainting's latents),
each with a can-fail twin (wrong shift, guidance, T5 dropped, strength, mask, sampler) moving it past 8/255."""

import numpy as np
import pytest
from flow_helpers import diffusers_run, exported, init_and_mask, max_diff_255, sdrt_run
from tiny_sd3 import SD3_SCHEDULER, build_tiny_sd3

from sdrt.errors import InvalidOption

PROMPT = "a photo of a grey squirrel in the sky"


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(diffusers pipeline, sdrt Pipeline) of a tiny SD 3.5 with T5, its T5 exported one block a part, as the
    full-size one is split (export/t5.py)."""
    from sdrt.export import t5

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(t5, "PART_BYTES", 1)
        return exported(tmp_path_factory.mktemp("tiny_sd3"), build_tiny_sd3)


def test_manifest_facts(sd3):
    m = sd3[1].manifest
    assert (m.family, m.prediction_type, m.latent_channels) == ("sd3", "flow", 16)
    assert (m.vae_scaling_factor, m.vae_shift_factor) == (1.5305, 0.0609)
    assert m.family_config["flow"] == {"num_train_timesteps": 1000, "shift": 3.0}
    assert m.family_config["t5"] == "text_encoder_3" and m.family_config["t5_max_length"] == 256
    assert [m.models[name]["part"] for name in ("text_encoder_3", "text_encoder_3_part1")] == [0, 1]


def test_txt2img_matches_diffusers(sd3):
    pipe, pipeline = sd3
    reference = diffusers_run(pipe, PROMPT, [3], guidance_scale=7.0)
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [3], cfg_scale=7.0), reference) <= 2.0
    # can-fail twins: another shift, another guidance scale, T5 dropped
    flow = pipeline.manifest.family_config["flow"]
    flow["shift"] = 1.0
    try:
        assert max_diff_255(sdrt_run(pipeline, PROMPT, [3], cfg_scale=7.0), reference) > 8.0
    finally:
        flow["shift"] = 3.0
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [3], cfg_scale=4.0), reference) > 8.0
    t5, pipeline.conditioner.t5 = pipeline.conditioner.t5, None
    try:
        assert max_diff_255(sdrt_run(pipeline, PROMPT, [3], cfg_scale=7.0), reference) > 8.0
    finally:
        pipeline.conditioner.t5 = t5


def test_batch_negative_prompt_and_no_guidance(sd3):
    pipe, pipeline = sd3
    ours = sdrt_run(pipeline, "a red cat", [5, 6], cfg_scale=5.0, negative_prompt="grey photo")
    reference = diffusers_run(pipe, "a red cat", [5, 6], guidance_scale=5.0, negative_prompt=["grey photo"] * 2)
    assert max_diff_255(ours, reference) <= 2.0
    assert max_diff_255(ours[0], ours[1]) > 8.0  # each image its own seed
    ours = sdrt_run(pipeline, "a red cat", [5], cfg_scale=1.0)  # guidance off: the conditional prediction only
    assert max_diff_255(ours, diffusers_run(pipe, "a red cat", [5], guidance_scale=1.0)) <= 2.0


def test_without_t5_matches_diffusers(tmp_path_factory):
    pipe, pipeline = exported(tmp_path_factory.mktemp("tiny_sd3_no_t5"), build_tiny_sd3, with_t5=False)
    assert pipeline.manifest.family_config["t5"] is None and "text_encoder_3" not in pipeline.manifest.models
    reference = diffusers_run(pipe, PROMPT, [1], guidance_scale=6.0)
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [1], cfg_scale=6.0), reference) <= 2.0


def test_img2img_matches_diffusers(sd3):
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe, pipeline = sd3
    img2img = StableDiffusion3Img2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image, _ = init_and_mask(0)
    reference = diffusers_run(img2img, PROMPT, [7], steps=5, image=image, strength=0.6, guidance_scale=7.0)
    kwargs = dict(steps=5, init_image=image, cfg_scale=7.0)
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [7], strength=0.6, **kwargs), reference) <= 2.0
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [7], strength=0.8, **kwargs), reference) > 8.0


def test_inpaint_matches_diffusers(sd3, latent_atol):
    """Compared on the final latents: diffusers' StableDiffusion3InpaintPipeline (0.42) decodes them without adding the
    VAE's shift_factor back (its txt2img and img2img pipelines add it), so its images are off by that shift."""
    from diffusers import StableDiffusion3InpaintPipeline

    pipe, pipeline = sd3
    inpaint = StableDiffusion3InpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    image, mask = init_and_mask(2)
    for strength in (1.0, 0.75):
        reference = diffusers_run(inpaint, PROMPT, [9], image=image, mask_image=mask, strength=strength,
                                  guidance_scale=7.0, output_type="latent")  # fmt: skip
        kwargs = dict(init_image=image, strength=strength, cfg_scale=7.0, output_type="latent")
        ours = sdrt_run(pipeline, PROMPT, [9], mask=mask, mask_blur=0, **kwargs)
        assert np.abs(ours - reference).max() <= latent_atol
        # can-fail twin: without the mask the kept area is repainted too
        assert np.abs(sdrt_run(pipeline, PROMPT, [9], **kwargs) - reference).max() > 0.1


def test_heun_matches_flow_match_heun(sd3):
    """Heun through the sigma form = diffusers' FlowMatchHeunDiscreteScheduler on the same sigmas."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe, pipeline = sd3
    heun = type(pipe)(**{**pipe.components, "scheduler": FlowMatchHeunDiscreteScheduler.from_config(SD3_SCHEDULER)})
    heun.set_progress_bar_config(disable=True)
    reference = diffusers_run(heun, PROMPT, [4], guidance_scale=7.0)
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [4], cfg_scale=7.0, sampler="Heun"), reference) <= 2.0
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [4], cfg_scale=7.0), reference) > 8.0  # Euler differs


@pytest.mark.parametrize(
    "field,value",
    [("sampler", "DPM++ 3M SDE"), ("scheduler", "karras"), ("width", 72), ("width", 512), ("clip_skip", 2),
     ("guidance_rescale", 0.5), ("lora", "<lora:style:0.8>")],
)  # fmt: skip
def test_options_the_family_cannot_honour_are_refused(sd3, field, value):
    with pytest.raises(InvalidOption, match=field):
        if field == "lora":  # a LoRA tag in the prompt
            sd3[1].generate(f"{PROMPT} {value}", steps=2, width=64, height=64, progress=False)
        else:
            sd3[1].generate(PROMPT, steps=2, progress=False, **{"width": 64, "height": 64, field: value})


@pytest.fixture(scope="module")
def ode_solution(sd3):
    """The flow ODE's solution for seed 12, as near as Heun (second order) gets in 150 steps; latents up to ~18."""
    return sdrt_run(sd3[1], PROMPT, [12], steps=150, sampler="Heun", cfg_scale=3.0, output_type="latent")


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "UniPC", "LMS", "DPM2"])
def test_other_samplers_solve_the_same_flow_ode(sd3, ode_solution, sampler):
    """No diffusers reference for these on flow sigmas: each integrates dx/dsigma = (x - D(x, sigma)) / sigma, so its
    error to the ODE's solution shrinks with the steps (measured here: 0.21 to 0.78 at 48 steps, 0.30 to 6.2 at 12),
    while cfg 4 instead of 3, another ODE, lands 3.3 to 3.7 away."""
    pipeline = sd3[1]
    kwargs = dict(sampler=sampler, cfg_scale=3.0, output_type="latent")
    coarse = np.abs(sdrt_run(pipeline, PROMPT, [12], steps=12, **kwargs) - ode_solution).max()
    fine = np.abs(sdrt_run(pipeline, PROMPT, [12], steps=48, **kwargs) - ode_solution).max()
    assert fine < 1.0 and fine <= coarse
    # can-fail twin: another guidance scale is another ODE (the schedule only changes how it is discretised)
    moved = np.abs(sdrt_run(pipeline, PROMPT, [12], steps=48, **{**kwargs, "cfg_scale": 4.0}) - ode_solution).max()
    assert moved > 2.0


def test_ray_batching_gives_each_request_its_own_images(sd3):
    """`sdrt serve --ray`'s batching (runtime/batching.py) runs SD 3.5 requests together: each request's images equal
    what it gets alone (the pooled inputs are stacked as the per-token ones)."""
    from sdrt.runtime import batching

    pipeline = sd3[1]
    common = dict(steps=3, cfg_scale=5.0, width=64, height=64)
    requests = [dict(prompt="a red cat", seed=1, **common), dict(prompt="a blue dog", negative_prompt="sky", seed=2,
                                                                 batch_size=2, **common)]  # fmt: skip
    batched = batching.generate_batch(pipeline, requests)
    for request, images in zip(requests, batched, strict=True):
        alone = pipeline.generate(**request, progress=False)
        assert [np.asarray(a).tolist() for a in images] == [np.asarray(b).tolist() for b in alone]
    assert np.asarray(batched[0][0]).tolist() != np.asarray(batched[1][0]).tolist()
