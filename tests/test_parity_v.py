"""SD 2-style v-prediction: sdrt's images against diffusers' StableDiffusionPipeline on a tiny v-model.

The fixture is SD 2-like (v-prediction, OpenCLIP-style text encoder, tokenizer padding with "!", native size
96 px standing for 768). Tolerances: images within 2/255 (max abs over all pixels), final latents within
LATENT_ATOL. test_v_parity_can_fail shows that reading the model as epsilon, or padding with EOS as SD 1.x
does, moves the images far past 2/255.
"""

import json
import shutil

import numpy as np
import pytest
from diffusers_reference import LATENT_RTOL, diffusers_run
from test_parity import PIXEL_TOL, SAMPLER_CASES, max_diff

from sdrt import Pipeline
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.tokenizer import ClipTokenizer

PROMPT = "a photo of a grey squirrel!"
NEGATIVE = "blue sky"


@pytest.fixture(scope="module")
def v_pipeline(tiny_sd_v, backend):
    return Pipeline.load(tiny_sd_v[1], backend=backend)


def sdrt_images(pipeline, seeds, **kw):
    images = pipeline.generate(PROMPT, seed=seeds[0], batch_size=len(seeds), progress=False, **kw)
    return np.stack([np.asarray(im) for im in images])


def test_manifest_says_sd2_v(tiny_sd_v):
    manifest = Manifest.load(tiny_sd_v[1])
    assert (manifest.family, manifest.prediction_type, manifest.native_size) == ("sd2", "v_prediction", 96)
    assert manifest.detected["prediction_type"] == {
        "value": "v_prediction",
        "from": "diffusers folder: scheduler prediction_type",
    }
    assert manifest.detected["family"]["from"] == "diffusers folder: text encoder hidden_act gelu (OpenCLIP)"


def test_tokenizer_pads_with_exclamation_mark_like_diffusers(tiny_sd_v, v_pipeline):
    """SD 2 pads with "!" (id 0), not EOS; the exported tokenizer keeps it, and "!" in a prompt is that token."""
    pipe, model = tiny_sd_v
    texts = [PROMPT, "", "a cat!!"]
    want = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True).input_ids
    got = ClipTokenizer.from_dir(model / "tokenizer")(texts, v_pipeline.manifest.text_max_length)
    assert got.shape == (3, 77) and got[1, 2:].tolist() == [0] * 75
    assert got.tolist() == want


@pytest.mark.parametrize(("sampler", "scheduler"), SAMPLER_CASES)
def test_v_images_match_diffusers(tiny_sd_v, v_pipeline, sampler, scheduler):
    pipe, _ = tiny_sd_v
    kw = dict(negative_prompt=NEGATIVE, width=64, height=72, steps=8, cfg_scale=6.0, sampler=sampler)
    want = diffusers_run(pipe, PROMPT, seeds=(5,), scheduler=scheduler, **kw)
    got = sdrt_images(v_pipeline, [5], scheduler=scheduler, **kw)
    assert got.shape == want.shape
    assert max_diff(got, want) <= PIXEL_TOL


@pytest.mark.parametrize(("sampler", "scheduler"), [("Euler", "automatic"), ("DPM++ 2M", "karras")])
def test_v_latents_match_diffusers(tiny_sd_v, v_pipeline, sampler, scheduler, latent_atol):
    pipe, _ = tiny_sd_v
    latents = np.random.default_rng(8).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kw = dict(negative_prompt=NEGATIVE, width=64, height=64, steps=8, cfg_scale=7.0, sampler=sampler)
    want = diffusers_run(pipe, PROMPT, seeds=(1,), scheduler=scheduler, latents=latents, output_type="latent", **kw)
    got = v_pipeline.generate(
        PROMPT, seed=1, scheduler=scheduler, latents=latents, output_type="latent", progress=False, **kw
    )
    np.testing.assert_allclose(got, want, atol=latent_atol, rtol=LATENT_RTOL)


def test_default_size_is_native_and_matches_diffusers(tiny_sd_v, v_pipeline):
    """No width/height: the manifest's native size (96 px here, as 768 for SD 2 v-models), as in the infotext."""
    pipe, _ = tiny_sd_v
    images = v_pipeline.generate(PROMPT, steps=6, seed=3, sampler="DDIM", progress=False)
    assert images[0].size == (96, 96) and "Size: 96x96," in images[0].info["parameters"]
    want = diffusers_run(pipe, PROMPT, width=96, height=96, steps=6, sampler="DDIM", seeds=(3,))
    assert max_diff(np.asarray(images[0])[None], want) <= PIXEL_TOL


def edited_copy(model, tmp_path, backend, edit_manifest=None, edit_tokenizer=None):
    folder = tmp_path / "edited"
    shutil.copytree(model, folder)
    for name, edit in (("model.json", edit_manifest), ("tokenizer/tokenizer_config.json", edit_tokenizer)):
        if edit:
            data = json.loads((folder / name).read_text())
            edit(data)
            (folder / name).write_text(json.dumps(data))
    return Pipeline.load(folder, backend=backend)


WRONG = {
    "as epsilon": dict(edit_manifest=lambda m: m.update(prediction_type="epsilon")),
    "EOS padding": dict(edit_tokenizer=lambda t: t.update(pad_token="<|endoftext|>")),
}


@pytest.mark.parametrize("change", list(WRONG), ids=list(WRONG))
def test_v_parity_can_fail(tiny_sd_v, tmp_path, backend, change):
    """The comparison above catches a v-model read as epsilon (measured: 187-223/255 over the four samplers),
    and SD 1.x's EOS padding on an SD 2 model (54-144/255)."""
    pipe, model = tiny_sd_v
    kw = dict(negative_prompt=NEGATIVE, width=64, height=72, steps=8, cfg_scale=6.0, sampler="Euler")
    want = diffusers_run(pipe, PROMPT, seeds=(5,), **kw)
    got = sdrt_images(edited_copy(model, tmp_path, backend, **WRONG[change]), [5], **kw)
    assert max_diff(got, want) > 4 * PIXEL_TOL, f"{change} went unnoticed"


# Every other sampler whose diffusers class runs the same algorithm, on the v-model too. PLMS is left out:
# diffusers' PNDM mixes raw v outputs where CompVis/A1111/sdrt mix eps (README); test_parity_multistep covers it
# against PNDM fed eps. DPM++ 3M SDE differs from diffusers by design after its third step (README).
MORE_V_CASES = [
    ("Heun", "automatic"),
    ("Heun", "karras"),
    ("DPM2", "automatic"),
    ("DPM2 a", "karras"),
    ("LMS", "automatic"),
    ("LMS", "karras"),
    ("DPM++ 2M SDE", "karras"),
    ("UniPC", "automatic"),
    ("LCM", "automatic"),
    ("Euler", "exponential"),
    ("DPM++ 2M", "beta"),
]


@pytest.mark.parametrize(("sampler", "scheduler"), MORE_V_CASES)
def test_more_samplers_match_diffusers_on_v(tiny_sd_v, v_pipeline, sampler, scheduler):
    pipe, _ = tiny_sd_v
    kw = dict(
        negative_prompt=NEGATIVE,
        width=64,
        height=64,
        steps=4 if sampler == "LCM" else 6,
        cfg_scale=6.0,
        sampler=sampler,
    )
    want = diffusers_run(pipe, PROMPT, seeds=(8, 9), scheduler=scheduler, **kw)
    got = sdrt_images(v_pipeline, [8, 9], scheduler=scheduler, **kw)
    assert max_diff(got, want) <= PIXEL_TOL
    wrong = sdrt_images(v_pipeline, [8, 9], scheduler=scheduler, **{**kw, "steps": kw["steps"] - 1})
    assert max_diff(wrong, want) > 4 * PIXEL_TOL  # the comparison can fail
