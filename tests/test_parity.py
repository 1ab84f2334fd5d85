"""sdrt's images and latents against diffusers' StableDiffusionPipeline on the same tiny weights and noise.

Tolerances: images within 2/255 (max abs over all pixels); final latents within latent_atol (conftest.py:
2e-3 on ONNX Runtime).
The tiny UNet's output has a x10 gain, so a wrong sampler, step count, guidance or negative prompt moves
images by far more than 2/255 (test_parity_can_fail proves it for each).
"""

import numpy as np
import pytest
from diffusers_reference import LATENT_RTOL, diffusers_run

PIXEL_TOL = 2  # /255
PROMPT = "a photo of a grey squirrel"
NEGATIVE = "blue sky"
SAMPLER_CASES = [
    ("Euler", "automatic"),
    ("Euler a", "automatic"),
    ("DDIM", "automatic"),
    ("DPM++ 2M", "automatic"),
    ("Euler", "karras"),
    ("DPM++ 2M", "karras"),
]


def sdrt_run(pipeline, seeds, output_type="pil", **kw):
    out = pipeline.generate(PROMPT, seed=seeds[0], batch_size=len(seeds), output_type=output_type, progress=False, **kw)
    return out if output_type == "latent" else np.stack([np.asarray(im) for im in out])


def max_diff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.mark.parametrize(("sampler", "scheduler"), SAMPLER_CASES)
@pytest.mark.parametrize(
    ("width", "height", "seeds", "cfg_scale"),
    [(64, 64, (7,), 7.0), (80, 64, (3, 4), 5.0), (64, 72, (11,), 1.0)],
    ids=["square-b1-cfg", "wide-b2-cfg", "tall-b1-nocfg"],
)
def test_images_match_diffusers_same_seed(tiny_sd, tiny_pipeline, sampler, scheduler, width, height, seeds, cfg_scale):
    pipe, _ = tiny_sd
    kw = dict(
        negative_prompt=NEGATIVE,
        width=width,
        height=height,
        steps=8,
        cfg_scale=cfg_scale,
        sampler=sampler,
        scheduler=scheduler,
    )
    want = diffusers_run(pipe, PROMPT, seeds=seeds, **kw)
    got = sdrt_run(tiny_pipeline, list(seeds), **kw)
    assert got.shape == want.shape
    assert max_diff(got, want) <= PIXEL_TOL


@pytest.mark.parametrize(("sampler", "scheduler"), SAMPLER_CASES)
def test_latents_match_diffusers_given_latents(tiny_sd, tiny_pipeline, sampler, scheduler, latent_atol):
    pipe, _ = tiny_sd
    latents = np.random.default_rng(5).standard_normal((2, 4, 8, 10)).astype(np.float32)
    kw = dict(
        negative_prompt=NEGATIVE,
        width=80,
        height=64,
        steps=8,
        cfg_scale=6.0,
        sampler=sampler,
        scheduler=scheduler,
        latents=latents,
    )
    want = diffusers_run(pipe, PROMPT, seeds=(21, 22), output_type="latent", **kw)
    got = sdrt_run(tiny_pipeline, [21, 22], output_type="latent", **kw)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=latent_atol, rtol=LATENT_RTOL)
    images = sdrt_run(tiny_pipeline, [21, 22], **kw)
    assert max_diff(images, diffusers_run(pipe, PROMPT, seeds=(21, 22), **kw)) <= PIXEL_TOL


def test_seed_gives_same_image_alone_or_in_batch(tiny_pipeline):
    kw = dict(width=64, height=64, steps=4, sampler="Euler a")
    batch = sdrt_run(tiny_pipeline, [100, 101, 102], **kw)
    alone = sdrt_run(tiny_pipeline, [101], **kw)
    assert max_diff(batch[1], alone[0]) == 0
    assert max_diff(batch[0], batch[1]) > PIXEL_TOL


def test_batch_count_continues_seeds(tiny_pipeline):
    images = tiny_pipeline.generate(
        PROMPT, width=64, height=64, steps=3, seed=40, batch_size=2, batch_count=2, progress=False
    )
    seeds = [int(im.info["parameters"].split("Seed: ")[1].split(",")[0]) for im in images]
    assert seeds == [40, 41, 42, 43]
    alone = sdrt_run(tiny_pipeline, [43], width=64, height=64, steps=3)
    assert max_diff(np.asarray(images[3]), alone[0]) == 0


WRONG = {
    "sampler": dict(sampler="Euler a"),
    "karras": dict(scheduler="karras"),
    "steps": dict(steps=9),
    "cfg": dict(cfg_scale=6.0),
    "negative prompt": dict(negative_prompt="red cat"),
    "seed": dict(seed_offset=1),
}


@pytest.mark.parametrize("change", list(WRONG), ids=list(WRONG))
def test_parity_can_fail(tiny_sd, tiny_pipeline, change):
    """Each parity check above would catch sdrt using a wrong sampler, schedule, step count, cfg, prompt or seed."""
    pipe, _ = tiny_sd
    kw = dict(
        negative_prompt=NEGATIVE, width=64, height=64, steps=8, cfg_scale=7.0, sampler="Euler", scheduler="automatic"
    )
    want = diffusers_run(pipe, PROMPT, seeds=(7,), **kw)
    wrong = {**kw, **WRONG[change]}
    seed = 7 + wrong.pop("seed_offset", 0)
    got = sdrt_run(tiny_pipeline, [seed], **wrong)
    assert max_diff(got, want) > 4 * PIXEL_TOL, f"a wrong {change} went unnoticed"
