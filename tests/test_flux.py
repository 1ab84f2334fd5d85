"""FLUX.1 (dev with its guidance input, schnell without): export of tiny random FluxPipelines and sdrt's torch-free
run of them against diffusers on the same weights and noise (2/255), each with a can-fail twin (> 8/255)."""

import numpy as np
import pytest
from flow_helpers import FlowRun, diffusers_images, encode_image, inpaint_inputs, max_diff_255

from sdrt.cli import main
from sdrt.errors import InvalidOption
from sdrt.runtime.rng import TorchCPUGenerator

PROMPTS = ["a photo of a red cat"]


def _exported(tmp_path_factory, variant):
    from tiny_flux import build_tiny_flux

    root = tmp_path_factory.mktemp(f"tiny_flux_{variant}")
    pipe = build_tiny_flux(root / "diffusers", variant)
    assert main(["export", str(root / "diffusers"), "-o", str(root / "onnx")]) == 0
    return pipe, FlowRun(root / "onnx")


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return _exported(tmp_path_factory, "dev")


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    return _exported(tmp_path_factory, "schnell")


def test_manifest_facts(dev, schnell):
    for (_, run), guided in ((dev, True), (schnell, False)):
        m = run.manifest
        assert (m.family, m.prediction_type, m.latent_channels) == ("flux", "flow", 16)
        assert (m.vae_scaling_factor, m.vae_shift_factor) == (0.3611, 0.1159)
        assert m.family_config["guidance_embeds"] is guided
        names = [t["name"] for t in m.models["transformer"]["inputs"]]
        assert ("guidance" in names) is guided
    assert dev[1].manifest.family_config["flow"]["use_dynamic_shifting"] is True


def test_dev_matches_diffusers(dev):
    pipe, run = dev
    ours = run.images(PROMPTS, seed=2, guidance=3.5)
    reference = diffusers_images(pipe, PROMPTS, seed=2, guidance=3.5)
    assert max_diff_255(ours, reference) <= 2.0
    # can-fail twins: another distilled guidance; no resolution-dependent shift
    assert max_diff_255(run.images(PROMPTS, seed=2, guidance=1.5), reference) > 8.0
    flow = run.manifest.family_config["flow"]
    flow["use_dynamic_shifting"] = False
    try:
        assert max_diff_255(run.images(PROMPTS, seed=2, guidance=3.5), reference) > 8.0
    finally:
        flow["use_dynamic_shifting"] = True


def test_dev_batch_non_square(dev):
    pipe, run = dev
    prompts = ["a blue dog", "the grey squirrel in the sky"]
    shape = (2, 16, 12, 8)  # 96 x 64 pixels: 6 x 4 packed tokens, position ids over both axes
    ours = run.vae.decode(run.latents(prompts, noise=TorchCPUGenerator(4).randn(shape), guidance=4.0, steps=3))
    ours = np.clip(ours / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    import torch

    reference = pipe(prompts, height=96, width=64, num_inference_steps=3, guidance_scale=4.0,
                     generator=torch.Generator().manual_seed(4), output_type="np").images  # fmt: skip
    assert ours.shape == reference.shape == (2, 96, 64, 3)
    assert max_diff_255(ours, reference) <= 2.0
    assert max_diff_255(ours[0], ours[1]) > 8.0


def test_schnell_matches_diffusers(schnell):
    pipe, run = schnell
    ours = run.images(PROMPTS, seed=6, guidance=0.0)
    reference = diffusers_images(pipe, PROMPTS, seed=6, guidance=0.0)
    assert max_diff_255(ours, reference) <= 2.0
    flow = run.manifest.family_config["flow"]
    flow["shift"] = 3.0  # can-fail twin: a shift schnell does not have
    try:
        assert max_diff_255(run.images(PROMPTS, seed=6, guidance=0.0), reference) > 8.0
    finally:
        flow["shift"] = 1.0


def test_img2img_matches_diffusers(dev):
    import torch
    from diffusers import FluxImg2ImgPipeline
    from PIL import Image

    pipe, run = dev
    img2img = FluxImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    reference = img2img(PROMPTS, image=image, strength=0.7, num_inference_steps=5, guidance_scale=3.5, height=64,
                        width=64, generator=torch.Generator().manual_seed(8), output_type="np").images  # fmt: skip
    generator = TorchCPUGenerator(8)  # the posterior sample first, then the noise, as diffusers draws them
    init = encode_image(run, image, generator)
    noise = generator.randn(init.shape)
    ours = run.images(PROMPTS, steps=5, guidance=3.5, init=init, noise=noise, strength=0.7)
    assert max_diff_255(ours, reference) <= 2.0
    moved = run.images(PROMPTS, steps=5, guidance=3.5, init=init, noise=noise, strength=0.4)
    assert max_diff_255(moved, reference) > 8.0


def test_sizes_and_samplers_refused_clearly(dev):
    _, run = dev
    with pytest.raises(InvalidOption, match="height"):
        run.latents(PROMPTS, noise=np.zeros((1, 16, 5, 8), np.float32))
    with pytest.raises(InvalidOption, match="sampler"):
        run.latents(PROMPTS, sampler="Euler a")


def test_inpaint_matches_diffusers(dev):
    import torch
    from diffusers import FluxInpaintPipeline

    pipe, run = dev
    inpaint = FluxInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    image, mask_image, latent_mask = inpaint_inputs(3)
    reference = inpaint(PROMPTS, image=image, mask_image=mask_image, strength=0.8, num_inference_steps=5,
                        guidance_scale=3.5, height=64, width=64, generator=torch.Generator().manual_seed(10),
                        output_type="np").images  # fmt: skip
    generator = TorchCPUGenerator(10)
    init = encode_image(run, image, generator)
    noise = generator.randn(init.shape)
    kwargs = dict(steps=5, guidance=3.5, init=init, noise=noise, strength=0.8)
    assert max_diff_255(run.images(PROMPTS, mask=latent_mask, **kwargs), reference) <= 2.0
    assert max_diff_255(run.images(PROMPTS, **kwargs), reference) > 8.0
