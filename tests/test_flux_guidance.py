"""FLUX.1's guidance as Forge and diffusers know it: distilled_cfg_scale (Forge's "Distilled CFG Scale", diffusers'
guidance_scale) fed to dev's transformer; cfg_scale > 1 with a negative prompt is true CFG (diffusers'
true_cfg_scale: two passes a step); the family's defaults (dev 28 steps, CFG 1, distilled 3.5; schnell 4 steps, no
guidance input); the options of another family refused by name. Parity within 2/255 of FluxPipeline, each with a
can-fail twin past 8/255."""

import base64
import dataclasses
import io
import json

import numpy as np
import pytest
from flow_helpers import diffusers_run, exported, max_diff_255, sdrt_run
from PIL import Image
from tiny_flux import build_tiny_flux

from sdrt.errors import InvalidOption
from sdrt.runtime.options import make_options

PROMPT = "a photo of a red cat"
NEGATIVE = "a blurry grey drawing"


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return exported(tmp_path_factory.mktemp("flux_guidance"), build_tiny_flux, variant="dev")


def schnell_manifest(manifest):
    """MANIFEST as a FLUX.1 schnell export (no guidance input): what resolving options asks of it."""
    return dataclasses.replace(manifest, family_config={**manifest.family_config, "guidance_embeds": False})


def test_true_cfg_with_a_negative_prompt_matches_diffusers(dev):
    pipe, pipeline = dev
    reference = diffusers_run(pipe, PROMPT, [3], guidance_scale=2.5, true_cfg_scale=4.0, negative_prompt=NEGATIVE)
    kwargs = dict(distilled_cfg_scale=2.5, negative_prompt=NEGATIVE)
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [3], cfg_scale=4.0, **kwargs), reference) <= 2.0
    # can-fail twins: no true CFG (CFG 1: one pass); another negative prompt; another true CFG scale
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [3], **kwargs), reference) > 8.0
    other = dict(kwargs, negative_prompt="a green dog")
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [3], cfg_scale=4.0, **other), reference) > 8.0
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [3], cfg_scale=2.0, **kwargs), reference) > 8.0


def test_true_cfg_with_an_empty_negative_prompt_matches_diffusers(dev):
    """Forge runs true CFG for any CFG scale above 1, with the empty negative prompt too (diffusers: "" given)."""
    pipe, pipeline = dev
    reference = diffusers_run(pipe, PROMPT, [4], steps=3, true_cfg_scale=3.0, negative_prompt="")
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [4], steps=3, cfg_scale=3.0), reference) <= 2.0
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [4], steps=3), reference) > 8.0


def test_the_family_defaults_are_fluxpipelines(dev):
    """Nothing set: 28 steps, distilled guidance 3.5, CFG 1 (FluxPipeline's defaults); the old reading of the A1111
    default CFG 7 as the guidance is gone."""
    pipe, pipeline = dev
    opts = make_options(pipeline.manifest, prompt=PROMPT)
    assert (opts.steps, opts.cfg_scale, opts.family_options.distilled_cfg_scale, opts.guided) == (28, 1.0, 3.5, False)
    reference = diffusers_run(pipe, PROMPT, [5], steps=28)
    images = pipeline.generate(PROMPT, seed=5, width=64, height=64, progress=False)
    assert max_diff_255(np.asarray(images[0], np.float64)[None] / 255, reference) <= 2.0
    assert "Distilled CFG Scale: 3.5" in images[0].info["parameters"]
    assert "Steps: 28" in images[0].info["parameters"] and "CFG scale: 1," in images[0].info["parameters"]
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [5], steps=28, distilled_cfg_scale=7.0), reference) > 8.0


def test_schnell_defaults_and_its_refusal(dev):
    manifest = schnell_manifest(dev[1].manifest)
    opts = make_options(manifest, prompt=PROMPT)
    assert (opts.steps, opts.cfg_scale, opts.family_options.distilled_cfg_scale) == (4, 1.0, None)
    with pytest.raises(InvalidOption, match="distilled_cfg_scale.*schnell"):
        make_options(manifest, prompt=PROMPT, distilled_cfg_scale=3.5)
    assert make_options(manifest, prompt=PROMPT, steps=8, cfg_scale=2.0).steps == 8  # given values win


@pytest.mark.parametrize(
    "field, value",
    [("skip_guidance_layers", [0]), ("skip_layer_guidance_scale", 2.8), ("prompt_2", "x"), ("distilled_cfg_scale", -1)],
)
def test_options_of_other_families_and_bad_values_are_refused_by_name(dev, field, value):
    with pytest.raises(InvalidOption, match=field):
        make_options(dev[1].manifest, prompt=PROMPT, **{field: value})


def test_distilled_guidance_is_refused_on_the_unet_families_which_keep_a1111s_defaults(tiny_pipeline):
    with pytest.raises(InvalidOption, match="distilled_cfg_scale is an FLUX.1 option"):
        make_options(tiny_pipeline.manifest, distilled_cfg_scale=3.5)
    opts = make_options(tiny_pipeline.manifest)
    assert (opts.steps, opts.cfg_scale) == (20, 7.0)


def test_http_api_takes_forges_fields_and_the_familys_defaults(dev):
    """distilled_cfg_scale is Forge's request field; a request without steps or cfg_scale gets FLUX's defaults (28,
    CFG 1), not A1111's (50, 7); cfg_scale > 1 with negative_prompt runs true CFG."""
    from fastapi.testclient import TestClient

    from sdrt.server.app import create_app

    pipe, pipeline = dev
    base = {"prompt": PROMPT, "width": 64, "height": 64, "seed": 3, "override_settings": {"randn_source": "CPU"}}
    with TestClient(create_app(pipeline)) as client:
        info = json.loads(client.post("/sdapi/v1/txt2img", json={**base, "steps": 2}).json()["info"])
        assert (info["steps"], info["cfg_scale"]) == (2, 1.0)
        assert "Distilled CFG Scale: 3.5" in info["infotexts"][0]
        true_cfg = {"steps": 4, "cfg_scale": 4.0, "negative_prompt": NEGATIVE, "distilled_cfg_scale": 2.5}
        answer = client.post("/sdapi/v1/txt2img", json={**base, **true_cfg})
        assert answer.status_code == 200
        image = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
        reference = diffusers_run(pipe, PROMPT, [3], guidance_scale=2.5, true_cfg_scale=4.0, negative_prompt=NEGATIVE)
        assert max_diff_255(np.asarray(image, np.float64)[None] / 255, reference) <= 2.0
        bad = client.post("/sdapi/v1/txt2img", json={**base, "skip_guidance_layers": [0]})
        assert bad.status_code == 422 and "skip_guidance_layers" in bad.text
        defaults = client.post("/sdapi/v1/txt2img", json={**base, "n_iter": 1})
        assert json.loads(defaults.json()["info"])["steps"] == 28


def test_cli_flag(dev, tmp_path):
    from sdrt.cli import main

    folder = str(dev[1].manifest.folder)
    args = ["generate", PROMPT, "-m", folder, "--steps", "2", "--width", "64", "--height", "64", "-o", str(tmp_path)]
    assert main([*args, "--distilled-cfg-scale", "2.5"]) == 0
    (png,) = tmp_path.glob("*.png")
    assert "Distilled CFG Scale: 2.5" in Image.open(png).info["parameters"]
    assert main([*args, "--skip-guidance-layers", "0"]) == 2


def test_img2img_steps_at_a_fractional_product_match_diffusers(dev, monkeypatch):
    """steps x strength 5 x 0.7: FluxImg2ImgPipeline skips int(5 - 3.5) = 1 step and runs 4 (Family.edit_steps of
    the flow families); the UNet families' int(3.5) = 3 is the can-fail twin."""
    from diffusers import FluxImg2ImgPipeline
    from flow_helpers import init_and_mask

    from sdrt.runtime.families.base import Family
    from sdrt.runtime.families.flow import Flux

    pipe, pipeline = dev
    img2img = FluxImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image, _ = init_and_mask(1)
    reference = diffusers_run(img2img, PROMPT, [8], steps=5, image=image, strength=0.7, guidance_scale=3.5)
    kwargs = dict(steps=5, init_image=image, strength=0.7)
    assert make_options(pipeline.manifest, **kwargs).steps_run == 4
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [8], **kwargs), reference) <= 2.0
    monkeypatch.setattr(Flux, "edit_steps", Family.edit_steps)
    assert make_options(pipeline.manifest, **kwargs).steps_run == 3
    assert max_diff_255(sdrt_run(pipeline, PROMPT, [8], **kwargs), reference) > 8.0


@pytest.mark.parametrize("steps, strength", [(5, 0.7), (10, 0.3), (7, 0.55), (20, 0.75), (3, 1.0), (4, 0.1)])
def test_edit_steps_follow_each_pipelines_get_timesteps(steps, strength):
    """The flow families: diffusers' SD 3 / FLUX img2img get_timesteps, float arithmetic included (10 x 0.3 is
    3.0000000000000004: 4 steps); the UNet families: int(steps x strength), as A1111 and StableDiffusionImg2Img."""
    from sdrt.runtime.families import registry

    flow_run = steps - int(max(steps - min(steps * strength, steps), 0))  # diffusers' t_start, as written there
    assert registry()["flux"].edit_steps(steps, strength) == registry()["sd3"].edit_steps(steps, strength) == flow_run
    assert registry()["sd1"].edit_steps(steps, strength) == min(int(steps * strength), steps)


def test_true_cfg_in_a_batch_matches_diffusers(dev):
    pipe, pipeline = dev
    kwargs = dict(negative_prompt=NEGATIVE)
    reference = diffusers_run(pipe, PROMPT, [6, 7], steps=3, true_cfg_scale=3.0, **kwargs)
    ours = sdrt_run(pipeline, PROMPT, [6, 7], steps=3, cfg_scale=3.0, distilled_cfg_scale=3.5, **kwargs)
    assert max_diff_255(ours, reference) <= 2.0 and max_diff_255(ours[0], ours[1]) > 8.0
