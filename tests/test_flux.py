"""FLUX.1 (dev with its guidance input, schnell without) through sdrt's Pipeline against diffusers' Flux pipelines
on the same weights and seeds: txt2img, batch at a non-square size, img2img, inpainting; within 2/255 on images
(latent_atol on inpainting's latents), each with a can-fail twin moving it past 8/255."""

import numpy as np
import pytest
from flow_helpers import diffusers_run, exported, init_and_mask, max_diff_255, sdrt_run
from tiny_flux import build_tiny_flux

PROMPT = "a photo of a red cat"


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return exported(tmp_path_factory.mktemp("tiny_flux_dev"), build_tiny_flux, variant="dev")


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    return exported(tmp_path_factory.mktemp("tiny_flux_schnell"), build_tiny_flux, variant="schnell")


def test_manifest_facts(dev, schnell):
    for (_, pipeline), guided in ((dev, True), (schnell, False)):
        m = pipeline.manifest
        assert (m.family, m.prediction_type, m.latent_channels) == ("flux", "flow", 16)
        assert (m.vae_scaling_factor, m.vae_shift_factor) == (0.3611, 0.1159)
        assert m.family_config["guidance_embeds"] is guided
        assert ("guidance" in [t["name"] for t in m.models["transformer"]["inputs"]]) is guided
    assert dev[1].manifest.family_config["flow"]["use_dynamic_shifting"] is True


def test_dev_matches_diffusers(dev):
    pipe, pipeline = dev
    reference = diffusers_run(pipe, PROMPT, [2], guidance_scale=3.5)
    ours = sdrt_run(pipeline, PROMPT, [2], distilled_cfg_scale=3.5, negative_prompt="ignored: CFG 1")
    assert max_diff_255(ours, reference) <= 2.0
    # can-fail twins: another distilled guidance; no resolution-dependent shift
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [2], distilled_cfg_scale=1.5), reference) > 8.0
    flow = pipeline.manifest.family_config["flow"]
    flow["use_dynamic_shifting"] = False
    try:
        assert max_diff_255(sdrt_run(pipeline, PROMPT, [2], distilled_cfg_scale=3.5), reference) > 8.0
    finally:
        flow["use_dynamic_shifting"] = True


def test_dev_batch_non_square(dev):
    import torch

    pipe, pipeline = dev
    prompt = "the grey squirrel in the sky"
    ours = sdrt_run(pipeline, prompt, [4, 5], steps=3, distilled_cfg_scale=4.0, width=64, height=96)
    generators = [torch.Generator().manual_seed(s) for s in (4, 5)]
    reference = pipe([prompt] * 2, height=96, width=64, num_inference_steps=3, guidance_scale=4.0,
                     generator=generators, output_type="np").images  # fmt: skip
    assert ours.shape == reference.shape == (2, 96, 64, 3)
    assert max_diff_255(ours, reference) <= 2.0
    assert max_diff_255(ours[0], ours[1]) > 8.0


def test_schnell_matches_diffusers(schnell):
    pipe, pipeline = schnell
    reference = diffusers_run(pipe, PROMPT, [6], guidance_scale=0.0)
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [6]), reference) <= 2.0
    flow = pipeline.manifest.family_config["flow"]
    flow["shift"] = 3.0  # can-fail twin: a shift schnell does not have
    try:
        assert max_diff_255(sdrt_run(pipeline, PROMPT, [6]), reference) > 8.0
    finally:
        flow["shift"] = 1.0


def test_img2img_matches_diffusers(dev):
    from diffusers import FluxImg2ImgPipeline

    pipe, pipeline = dev
    img2img = FluxImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image, _ = init_and_mask(1)
    # steps x strength a whole number here; a fractional one (5 x 0.7) in test_flux_guidance.py
    reference = diffusers_run(img2img, PROMPT, [8], steps=5, image=image, strength=0.8, guidance_scale=3.5)
    kwargs = dict(steps=5, init_image=image, distilled_cfg_scale=3.5)
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [8], strength=0.8, **kwargs), reference) <= 2.0
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [8], strength=0.4, **kwargs), reference) > 8.0


def test_inpaint_matches_diffusers(dev, latent_atol):
    """Compared on the final latents (sdrt pastes the kept area back onto the images, as A1111; diffusers does not)."""
    from diffusers import FluxInpaintPipeline

    pipe, pipeline = dev
    inpaint = FluxInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    image, mask = init_and_mask(3)
    reference = diffusers_run(inpaint, PROMPT, [10], steps=5, image=image, mask_image=mask, strength=0.8,
                              guidance_scale=3.5, output_type="latent")  # fmt: skip
    from diffusers import FluxPipeline

    reference = FluxPipeline._unpack_latents(torch_tensor(reference), 64, 64, 8).numpy()
    kwargs = dict(steps=5, init_image=image, strength=0.8, distilled_cfg_scale=3.5, output_type="latent")
    assert np.abs(sdrt_run(pipeline, PROMPT, [10], mask=mask, mask_blur=0, **kwargs) - reference).max() <= latent_atol
    assert np.abs(sdrt_run(pipeline, PROMPT, [10], **kwargs) - reference).max() > 0.1


def torch_tensor(array):
    import torch

    return torch.from_numpy(np.asarray(array))


def test_infotext_read_back_regenerates_the_image(dev):
    from sdrt.runtime.infotext import generate_kwargs, parse_infotext

    _, pipeline = dev
    kwargs = dict(steps=3, distilled_cfg_scale=2.5, seed=11, width=64, height=80, progress=False)
    image = pipeline.generate(PROMPT, **kwargs)[0]
    kwargs = generate_kwargs(parse_infotext(image.info["parameters"]))
    again = pipeline.generate(progress=False, **kwargs)[0]
    assert np.array_equal(np.asarray(again), np.asarray(image))
    assert (kwargs["distilled_cfg_scale"], kwargs["cfg_scale"], kwargs["width"]) == (2.5, 1.0, 64)


def test_http_api_and_cli(dev, tmp_path):
    """The A1111 API and `sdrt generate` run FLUX through the same Pipeline; a sampler it cannot run is a 422 / exit 2
    naming the field."""
    from fastapi.testclient import TestClient

    from sdrt.cli import main
    from sdrt.server.app import create_app

    pipe, pipeline = dev
    request = {"prompt": PROMPT, "steps": 3, "distilled_cfg_scale": 3.5, "width": 64, "height": 64, "seed": 2}
    with TestClient(create_app(pipeline)) as client:
        assert client.post("/sdapi/v1/txt2img", json=request).status_code == 200
        bad = client.post("/sdapi/v1/txt2img", json={**request, "sampler_name": "DPM++ SDE"})
        assert bad.status_code == 422 and "sampler" in bad.text
    folder = str(pipeline.manifest.folder)
    args = ["generate", PROMPT, "-m", folder, "--steps", "2", "--width", "64", "--height", "64", "-o", str(tmp_path)]
    assert main(args) == 0 and len(list(tmp_path.glob("*.png"))) == 1
    assert main([*args, "--sampler", "DPM++ 3M SDE"]) == 2


def test_export_controlnet_variant_refused(dev, tmp_path):
    from sdrt.cli import main

    source = dev[1].manifest.folder.parent / "diffusers"
    assert main(["export", str(source), "-o", str(tmp_path / "out"), "--controlnet"]) == 2
    assert not (tmp_path / "out").exists()


def test_low_vram_staging_gives_the_same_image(dev):
    """low_vram: one engine resident at a time (T5's parts, CLIP, the transformer, the VAE each loaded in turn)."""
    from sdrt import Pipeline

    _, pipeline = dev
    staged = Pipeline.load(pipeline.manifest.folder, low_vram=True)
    assert staged.memory.staged
    kwargs = dict(steps=2, distilled_cfg_scale=3.5, seed=13, width=64, height=64, output_type="latent", progress=False)
    np.testing.assert_array_equal(staged.generate(PROMPT, **kwargs), pipeline.generate(PROMPT, **kwargs))
    loaded = [name for name, engine in staged.engines.items() if engine.inner.session is not None]
    assert loaded == ["transformer"], loaded  # the last one run (latents: no VAE), alone
    assert staged.engines["transformer"].stager.loads == 3  # CLIP-L, T5, the transformer: each loaded in turn


def test_fp16_export_runs_close_to_fp32(dev, tmp_path):
    """--precision fp16: the transformer and VAE in fp16, CLIP and T5 kept fp32 (T5 overflows in fp16)."""
    from sdrt import Pipeline
    from sdrt.cli import main

    _, pipeline = dev
    source = pipeline.manifest.folder.parent / "diffusers"
    assert main(["export", str(source), "-o", str(tmp_path / "fp16"), "--precision", "fp16"]) == 0
    half = Pipeline.load(tmp_path / "fp16")
    precisions = {name: entry["precision"] for name, entry in half.manifest.models.items()}
    assert precisions == {"text_encoder": "fp32", "text_encoder_2": "fp32", "transformer": "fp16",
                          "vae_decoder": "fp16", "vae_encoder": "fp16"}  # fmt: skip
    kwargs = dict(steps=3, distilled_cfg_scale=3.5)
    diff = max_diff_255(sdrt_run(half, PROMPT, [14], **kwargs), sdrt_run(pipeline, PROMPT, [14], **kwargs))
    assert diff <= 4.0  # measured 1/255


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M SDE"])
def test_stochastic_samplers_run_in_their_flow_form(dev, sampler):
    """Euler a and DPM++ 2M SDE on FLUX: their rectified-flow steps (flow_samplers.py; their distributions are
    checked in test_flow_pieces.py), reproducible per seed, another image than Euler's."""
    _, pipeline = dev
    kwargs = dict(steps=4, distilled_cfg_scale=3.5, sampler=sampler)
    first = sdrt_run(pipeline, PROMPT, [15], **kwargs)
    assert np.array_equal(first, sdrt_run(pipeline, PROMPT, [15], **kwargs))
    assert max_diff_255(first, sdrt_run(pipeline, PROMPT, [15], steps=4, distilled_cfg_scale=3.5)) > 8.0
