"""SD 3.5: export of a tiny random StableDiffusion3Pipeline and sdrt's torch-free run of it against diffusers on the
same weights and noise (2/255), each with a can-fail twin that moves the image past 8/255."""

import numpy as np
import pytest
from flow_helpers import FlowRun, diffusers_images, encode_image, inpaint_inputs, max_diff_255
from tiny_sd3 import SD3_SCHEDULER

from sdrt.cli import main
from sdrt.runtime.rng import TorchCPUGenerator

PROMPTS = ["a photo of a grey squirrel in the sky"]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(diffusers pipeline, FlowRun) of a tiny SD 3.5 with T5, exported with `sdrt export`; its T5 in one part per
    block, as the full-size one is exported (export/t5.py)."""
    from tiny_sd3 import build_tiny_sd3

    from sdrt.export import t5

    root = tmp_path_factory.mktemp("tiny_sd3")
    pipe = build_tiny_sd3(root / "diffusers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(t5, "PART_BYTES", 1)
        assert main(["export", str(root / "diffusers"), "-o", str(root / "onnx")]) == 0
    return pipe, FlowRun(root / "onnx")


@pytest.fixture(scope="module")
def sd3_no_t5(tmp_path_factory):
    """The same architecture without text_encoder_3 (diffusers conditions on zeros in T5's place)."""
    from tiny_sd3 import build_tiny_sd3

    root = tmp_path_factory.mktemp("tiny_sd3_no_t5")
    pipe = build_tiny_sd3(root / "diffusers", with_t5=False)
    assert main(["export", str(root / "diffusers"), "-o", str(root / "onnx")]) == 0
    return pipe, FlowRun(root / "onnx")


def test_manifest_facts(sd3):
    _, run = sd3
    m = run.manifest
    assert (m.family, m.prediction_type, m.latent_channels) == ("sd3", "flow", 16)
    assert (m.vae_scaling_factor, m.vae_shift_factor) == (1.5305, 0.0609)
    assert m.family_config["flow"] == {"num_train_timesteps": 1000, "shift": 3.0}
    assert m.family_config["t5"] == "text_encoder_3" and m.family_config["t5_max_length"] == 256
    assert [m.models[name]["part"] for name in ("text_encoder_3", "text_encoder_3_part1")] == [0, 1]


def test_txt2img_matches_diffusers(sd3):
    pipe, run = sd3
    ours = run.images(PROMPTS, seed=3, guidance=7.0)
    reference = diffusers_images(pipe, PROMPTS, seed=3, guidance=7.0)
    assert max_diff_255(ours, reference) <= 2.0
    # can-fail twins: another shift, another guidance scale, T5 dropped each move the image
    run.manifest.family_config["flow"]["shift"] = 1.0
    try:
        assert max_diff_255(run.images(PROMPTS, seed=3, guidance=7.0), reference) > 8.0
    finally:
        run.manifest.family_config["flow"]["shift"] = 3.0
    assert max_diff_255(run.images(PROMPTS, seed=3, guidance=4.0), reference) > 8.0
    t5 = run.manifest.family_config.pop("t5")
    try:
        assert max_diff_255(run.images(PROMPTS, seed=3, guidance=7.0), reference) > 8.0
    finally:
        run.manifest.family_config["t5"] = t5


def test_batch_negative_prompt_and_no_guidance(sd3):
    pipe, run = sd3
    prompts = ["a red cat", "a blue dog in the sky"]
    ours = run.images(prompts, seed=5, guidance=5.0, negative=["grey", "photo"])
    reference = diffusers_images(pipe, prompts, seed=5, guidance=5.0, negative_prompt=["grey", "photo"])
    assert max_diff_255(ours, reference) <= 2.0
    assert max_diff_255(ours[0], ours[1]) > 8.0  # the two prompts (and noises) differ
    ours = run.images(prompts[:1], seed=5, guidance=1.0)  # guidance off: the conditional prediction only
    assert max_diff_255(ours, diffusers_images(pipe, prompts[:1], seed=5, guidance=1.0)) <= 2.0


def test_without_t5_matches_diffusers(sd3_no_t5):
    pipe, run = sd3_no_t5
    assert run.manifest.family_config["t5"] is None and "text_encoder_3" not in run.manifest.models
    ours = run.images(PROMPTS, seed=1, guidance=6.0)
    reference = diffusers_images(pipe, PROMPTS, seed=1, guidance=6.0)
    assert max_diff_255(ours, reference) <= 2.0


def test_img2img_matches_diffusers(sd3):
    import torch
    from diffusers import StableDiffusion3Img2ImgPipeline
    from PIL import Image

    pipe, run = sd3
    img2img = StableDiffusion3Img2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    generator = torch.Generator().manual_seed(7)
    reference = img2img(PROMPTS, image=image, strength=0.6, num_inference_steps=5, guidance_scale=7.0,
                        generator=generator, output_type="np").images  # fmt: skip
    # diffusers draws the VAE posterior sample first, then the noise, from the one generator
    generator = TorchCPUGenerator(7)
    init = encode_image(run, image, generator)
    noise = generator.randn(init.shape)
    ours = run.images(PROMPTS, steps=5, guidance=7.0, init=init, noise=noise, strength=0.6)
    assert max_diff_255(ours, reference) <= 2.0
    # can-fail twin: another strength starts elsewhere
    assert (
        max_diff_255(run.images(PROMPTS, steps=5, guidance=7.0, init=init, noise=noise, strength=0.8), reference) > 8.0
    )


def test_inpaint_matches_diffusers(sd3, latent_atol):
    """Compared on the final latents: diffusers' StableDiffusion3InpaintPipeline (0.42) decodes them without adding the
    VAE's shift_factor back (its txt2img and img2img pipelines add it), so its images are off by that shift."""
    import torch
    from diffusers import StableDiffusion3InpaintPipeline

    pipe, run = sd3
    inpaint = StableDiffusion3InpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    image, mask_image, latent_mask = inpaint_inputs(2)
    for strength in (1.0, 0.75):
        reference = inpaint(PROMPTS, image=image, mask_image=mask_image, strength=strength, num_inference_steps=4,
                            guidance_scale=7.0, height=64, width=64, generator=torch.Generator().manual_seed(9),
                            output_type="latent").images.numpy()  # fmt: skip
        generator = TorchCPUGenerator(9)  # the image's posterior sample, then the noise
        init = encode_image(run, image, generator)
        noise = generator.randn(init.shape)
        kwargs = dict(guidance=7.0, init=init, noise=noise, strength=strength)
        ours = run.latents(PROMPTS, mask=latent_mask, **kwargs)
        assert np.abs(ours - reference).max() <= latent_atol
        # can-fail twin: without the mask the kept area is repainted too
        assert np.abs(run.latents(PROMPTS, **kwargs) - reference).max() > 0.1


def test_heun_matches_flow_match_heun(sd3):
    """Heun through the sigma form = diffusers' FlowMatchHeunDiscreteScheduler on the same sigmas."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe, run = sd3
    heun = type(pipe)(**{**pipe.components, "scheduler": FlowMatchHeunDiscreteScheduler.from_config(SD3_SCHEDULER)})
    heun.set_progress_bar_config(disable=True)
    reference = diffusers_images(heun, PROMPTS, seed=4, steps=4, guidance=7.0)
    assert max_diff_255(run.images(PROMPTS, seed=4, steps=4, guidance=7.0, sampler="Heun"), reference) <= 2.0
    assert max_diff_255(run.images(PROMPTS, seed=4, steps=4, guidance=7.0), reference) > 8.0  # Euler differs
