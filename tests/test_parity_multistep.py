"""PLMS, UniPC, LCM, DDIM with eta, the schedule types, timestep_spacing, zero terminal SNR and guidance_rescale
against diffusers on the same tiny weights and noise.

Tolerances: images within PIXEL_TOL = 2/255 (max abs over all pixels), final latents within LATENT_ATOL.
Every image case also runs sdrt once with one option wrong and asserts that this misses diffusers' image by
more than 4 * PIXEL_TOL, so each comparison could fail. The sampler-level tests at the end step diffusers'
scheduler classes and sdrt's samplers on a smooth synthetic model, without the UNet (float32 tolerances).
"""

import json

import numpy as np
import pytest
from diffusers_reference import LATENT_RTOL, diffusers_run
from test_parity import NEGATIVE, PIXEL_TOL, PROMPT, max_diff, sdrt_run
from tiny_sd import SD15_SCHEDULER_KWARGS

from sdrt.runtime.errors import InvalidOption, ModelError
from sdrt.runtime.manifest import SchedulerConfig
from sdrt.runtime.schedules import build_schedule

BASE = dict(negative_prompt=NEGATIVE, width=64, height=64, steps=8, cfg_scale=7.0)
B2_NOCFG = dict(width=80, seeds=(3, 4), cfg_scale=1.0)
TURBO = dict(cfg_scale=0.0, timestep_spacing="trailing")  # SD-Turbo: 1-4 steps, no guidance, trailing spacing
# id -> (options, the wrong option that must break the match); "seeds" defaults to (7,)
CASES = {
    "plms-b1-cfg": (dict(sampler="PLMS"), dict(sampler="DDIM")),
    "plms-b2-nocfg": (dict(sampler="PLMS", **B2_NOCFG), dict(steps=9)),
    "plms-2-steps": (dict(sampler="PLMS", steps=2), dict(sampler="DDIM")),
    "plms-3-steps": (dict(sampler="PLMS", steps=3), dict(steps=4)),
    "plms-trailing": (dict(sampler="PLMS", steps=10, timestep_spacing="trailing"), dict(timestep_spacing="leading")),
    "unipc-b1-cfg": (dict(sampler="UniPC"), dict(sampler="DPM++ 2M")),
    "unipc-b2-nocfg": (dict(sampler="UniPC", **B2_NOCFG), dict(scheduler="karras")),
    "unipc-3-steps": (dict(sampler="UniPC", steps=3), dict(steps=4)),
    "unipc-leading": (dict(sampler="UniPC", timestep_spacing="leading"), dict(timestep_spacing=None)),
    "lcm-b1-nocfg": (dict(sampler="LCM", steps=4, cfg_scale=1.0), dict(steps=5)),
    "lcm-b2-cfg": (dict(sampler="LCM", steps=4, width=80, seeds=(3, 4)), dict(cfg_scale=1.0)),
    "ddim-eta1-b1": (dict(sampler="DDIM", eta=1.0), dict(eta=0.0)),
    "ddim-eta0.5-b2": (dict(sampler="DDIM", eta=0.5, **B2_NOCFG), dict(eta=1.0)),
    "euler-exponential": (dict(sampler="Euler", scheduler="exponential"), dict(scheduler="karras")),
    "euler-beta": (dict(sampler="Euler", scheduler="beta"), dict(scheduler="automatic")),
    "dpmpp2m-exponential": (dict(sampler="DPM++ 2M", scheduler="exponential"), dict(scheduler="karras")),
    "dpmpp2m-beta-b2": (dict(sampler="DPM++ 2M", scheduler="beta", **B2_NOCFG), dict(scheduler="exponential")),
    "unipc-exponential": (dict(sampler="UniPC", scheduler="exponential"), dict(scheduler="beta")),
    "unipc-beta": (dict(sampler="UniPC", scheduler="beta"), dict(scheduler="exponential")),
    "heun-beta": (dict(sampler="Heun", scheduler="beta"), dict(scheduler="karras")),
    "lms-exponential": (dict(sampler="LMS", scheduler="exponential"), dict(scheduler="karras")),
    "dpm2-exponential": (dict(sampler="DPM2", scheduler="exponential"), dict(scheduler="karras")),
    "euler-trailing": (dict(sampler="Euler", timestep_spacing="trailing"), dict(timestep_spacing=None)),
    "guidance-rescale-b2": (dict(sampler="Euler", guidance_rescale=0.7, seeds=(3, 4)), dict(guidance_rescale=0.0)),
    "turbo-euler-a-1": (dict(sampler="Euler a", steps=1, **TURBO), dict(timestep_spacing="leading")),
    "turbo-euler-a-4-b2": (dict(sampler="Euler a", steps=4, seeds=(3, 4), **TURBO), dict(steps=3)),
    "turbo-unipc-2": (dict(sampler="UniPC", steps=2, **TURBO), dict(steps=1)),
    "turbo-lcm-1": (dict(sampler="LCM", steps=1, cfg_scale=0.0), dict(steps=2)),
}


def check_case(pipe, sdrt_pipeline, options: dict, wrong: dict):
    kw = {**BASE, **options}
    seeds = kw.pop("seeds", (7,))
    want = diffusers_run(pipe, PROMPT, seeds=seeds, **kw)
    got = sdrt_run(sdrt_pipeline, list(seeds), **kw)
    assert got.shape == want.shape
    assert max_diff(got, want) <= PIXEL_TOL
    assert max_diff(sdrt_run(sdrt_pipeline, list(seeds), **{**kw, **wrong}), want) > 4 * PIXEL_TOL, "could not fail"


@pytest.mark.parametrize("case", list(CASES))
def test_images_match_diffusers(tiny_sd, tiny_pipeline, case):
    check_case(tiny_sd[0], tiny_pipeline, *CASES[case])


@pytest.mark.parametrize(("sampler", "steps"), [("PLMS", 8), ("UniPC", 8), ("LCM", 4)])
def test_latents_match_diffusers_given_latents(tiny_sd, tiny_pipeline, sampler, steps, latent_atol):
    latents = np.random.default_rng(5).standard_normal((2, 4, 8, 10)).astype(np.float32)
    kw = dict(BASE, width=80, steps=steps, cfg_scale=6.0, sampler=sampler, latents=latents)
    want = diffusers_run(tiny_sd[0], PROMPT, seeds=(21, 22), output_type="latent", **kw)
    got = sdrt_run(tiny_pipeline, [21, 22], output_type="latent", **kw)
    # measured: 2.5e-4 to 1.1e-3 on values up to 216
    np.testing.assert_allclose(got, want, atol=latent_atol, rtol=LATENT_RTOL)


# Zero terminal SNR (Lin et al. 2023): the tiny weights read as a v-prediction model whose scheduler config rescales
# the betas and spaces timesteps "trailing". A random UNet's output is as much a v as an eps, so the same ONNX files
# serve: only model.json (sdrt) and the scheduler config (diffusers) change.
ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


@pytest.fixture(scope="module")
def zero_snr(tiny_sd, tmp_path_factory, backend):
    """(diffusers pipeline, sdrt Pipeline) of the zero-terminal-SNR v-prediction reading of the tiny model."""
    from diffusers import StableDiffusionPipeline

    from sdrt import Pipeline

    pipe, onnx = tiny_sd
    folder = tmp_path_factory.mktemp("zero_snr")
    for item in onnx.iterdir():
        if item.name != "model.json":
            (folder / item.name).symlink_to(item)
    manifest = json.loads((onnx / "model.json").read_text())
    manifest["prediction_type"] = "v_prediction"
    manifest["scheduler"].update(ZERO_SNR)
    (folder / "model.json").write_text(json.dumps(manifest))
    ref = StableDiffusionPipeline(**{k: v for k, v in pipe.components.items() if k != "image_encoder"})
    ref.set_progress_bar_config(disable=True)
    config = json.loads((onnx.parent / "diffusers" / "scheduler" / "scheduler_config.json").read_text())
    ref.base_scheduler_config = {**config, "prediction_type": "v_prediction", **ZERO_SNR}
    return ref, Pipeline.load(folder, backend=backend)


ZERO_SNR_CASES = {
    "euler-rescaled-cfg": (dict(sampler="Euler", guidance_rescale=0.7), dict(guidance_rescale=0.0)),
    "euler-a-b2": (dict(sampler="Euler a", seeds=(3, 4)), dict(steps=9)),
    "ddim-10-steps": (dict(sampler="DDIM", steps=10), dict(steps=9)),
    "unipc-nocfg": (dict(sampler="UniPC", cfg_scale=1.0), dict(sampler="DPM++ 2M")),
}


@pytest.mark.parametrize("case", list(ZERO_SNR_CASES))
def test_zero_terminal_snr_matches_diffusers(zero_snr, case):
    check_case(*zero_snr, *ZERO_SNR_CASES[case])


def test_zero_terminal_snr_plms_matches_pndm_on_the_implied_eps(zero_snr, monkeypatch):
    """PLMS on a zero-terminal-SNR v-model, against diffusers' PNDMScheduler made to see what CompVis' PLMS sees.

    diffusers' PNDM ignores rescale_betas_zero_snr, and for v-prediction it mixes the raw v outputs of several steps
    before converting them to eps. CompVis' PLMS (A1111's) and sdrt convert each output to eps at its own timestep
    first. So the reference gets the rescaled alphas_cumprod (Euler's, with 2**-24 last, as sdrt's) and a UNet whose
    output is already that eps: sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t.
    """
    import diffusers
    import torch

    ref, sdrt_pipeline = zero_snr
    config = ref.base_scheduler_config
    alphas_cumprod = diffusers.EulerDiscreteScheduler.from_config(config).alphas_cumprod
    pndm = diffusers.PNDMScheduler.from_config({**config, "prediction_type": "epsilon"}, skip_prk_steps=True)
    pndm.alphas_cumprod, pndm.final_alpha_cumprod = alphas_cumprod, alphas_cumprod[0]
    ref.scheduler = pndm
    v_forward = ref.unet.forward

    def eps_forward(sample, timestep, *args, **kwargs):
        v = v_forward(sample, timestep, *args, **kwargs)[0]
        a = alphas_cumprod[int(timestep)]
        return (a.sqrt() * v + (1 - a).sqrt() * sample,)

    monkeypatch.setattr(ref.unet, "forward", eps_forward)
    kw = dict(BASE, steps=10)
    out = ref(
        PROMPT,
        negative_prompt=kw["negative_prompt"],
        width=kw["width"],
        height=kw["height"],
        num_inference_steps=kw["steps"],
        guidance_scale=kw["cfg_scale"],
        generator=[torch.Generator("cpu").manual_seed(7)],
        output_type="np",
    )
    want = (out.images * 255).round().astype(np.uint8)
    got = sdrt_run(sdrt_pipeline, [7], sampler="PLMS", **kw)
    assert max_diff(got, want) <= PIXEL_TOL
    assert max_diff(sdrt_run(sdrt_pipeline, [7], sampler="DDIM", **kw), want) > 4 * PIXEL_TOL


def test_zero_terminal_snr_refuses_leading_spacing(zero_snr):
    with pytest.raises(InvalidOption, match="timestep_spacing.*zero terminal SNR"):
        zero_snr[1].generate(PROMPT, sampler="DDIM", timestep_spacing="leading", progress=False)


def test_zero_terminal_snr_needs_v_prediction(tiny_sd, tmp_path):
    from sdrt.runtime.manifest import Manifest

    for item in tiny_sd[1].iterdir():
        if item.name != "model.json":
            (tmp_path / item.name).symlink_to(item)
    manifest = json.loads((tiny_sd[1] / "model.json").read_text())
    manifest["scheduler"].update(ZERO_SNR)  # epsilon prediction
    (tmp_path / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="rescale_betas_zero_snr needs prediction_type 'v_prediction'"):
        Manifest.load(tmp_path)


BAD_OPTIONS = [
    (dict(scheduler="fancy"), "scheduler", "automatic, uniform, karras, exponential, sgm_uniform, simple, beta"),
    (dict(timestep_spacing="even"), "timestep_spacing", "leading, linspace, trailing"),
    (dict(timestep_spacing="trailing", scheduler="sgm_uniform"), "timestep_spacing", "uses no spacing"),
    (dict(timestep_spacing="trailing", sampler="LCM"), "timestep_spacing", "uses no spacing"),
    (dict(timestep_spacing="leading", sampler="UniPC", scheduler="karras"), "timestep_spacing", "uses no spacing"),
    (dict(guidance_rescale=0.5, cfg_scale=1.0), "guidance_rescale", "cfg_scale <= 1"),
    (dict(guidance_rescale=1.5), "guidance_rescale", "from 0 to 1"),
    (dict(sampler="LCM", steps=51), "steps", "1 to 50 with LCM"),
    (dict(sampler="DPM++ 2M Karras", scheduler="beta"), "scheduler", "automatic or karras"),
]


@pytest.mark.parametrize(
    ("options", "field", "allowed"), BAD_OPTIONS, ids=[b[1] + str(i) for i, b in enumerate(BAD_OPTIONS)]
)
def test_bad_options_are_refused(tiny_pipeline, options, field, allowed):
    with pytest.raises(InvalidOption, match=field) as info:
        tiny_pipeline.generate(PROMPT, progress=False, **options)
    assert info.value.field == field and allowed in info.value.allowed


@pytest.mark.parametrize(
    ("name", "scheduler", "want"),
    [
        ("plms", "Automatic", ("PLMS", "automatic")),
        ("unipc", "SGM Uniform", ("UniPC", "sgm_uniform")),
        ("k_lcm", "SGMUniform", ("LCM", "sgm_uniform")),
        ("lcm", "simple", ("LCM", "simple")),
        ("Euler Exponential", "automatic", ("Euler", "exponential")),
        ("DPM++ 2M Karras", "Karras", ("DPM++ 2M", "karras")),
    ],
)
def test_sampler_and_schedule_names(name, scheduler, want):
    from sdrt.runtime.options import SCHEDULERS, resolve_sampler
    from sdrt.runtime.schedules import SCHEDULES

    assert tuple(SCHEDULERS) == SCHEDULES  # one label per schedule type
    assert resolve_sampler(name, scheduler) == want


def test_infotext_records_schedule_and_options(tiny_pipeline):
    image = tiny_pipeline.generate(
        PROMPT,
        width=64,
        height=64,
        steps=2,
        sampler="UniPC",
        scheduler="sgm_uniform",
        guidance_rescale=0.5,
        seed=1,
        progress=False,
    )[0]
    text = image.info["parameters"]
    assert "Sampler: UniPC, Schedule type: SGM Uniform" in text and "Guidance rescale: 0.5" in text
    image = tiny_pipeline.generate(PROMPT, steps=2, timestep_spacing="trailing", seed=1, progress=False)[0]
    assert "Timestep spacing: trailing" in image.info["parameters"]


# Sampler level: diffusers' scheduler classes stepped on a smooth synthetic model, against sdrt's samplers on the
# same sigmas; no UNet, so many step counts and orders are cheap to check.
SD15 = SD15_SCHEDULER_KWARGS
SAMPLER_ATOL = 1e-4  # float32 over up to 20 steps on values up to ~15; measured: up to 2.3e-5


def synthetic_eps(x_vp: np.ndarray, t: float) -> np.ndarray:
    """A smooth, nonlinear stand-in for a UNet's eps prediction at timestep t."""
    x = x_vp.astype(np.float64)
    return (0.8 * np.tanh(1.5 * x) + 0.3 * np.cos(t / 120) * x + 0.05 * np.sin(3 * x + t / 300)).astype(np.float32)


def diffusers_loop(cls_name: str, steps: int, x_start: np.ndarray, noises=None, **overrides) -> np.ndarray:
    import diffusers
    import torch

    ref = getattr(diffusers, cls_name).from_config(SD15, **overrides)
    ref.set_timesteps(steps)
    x = torch.from_numpy(x_start) * ref.init_noise_sigma
    for t in ref.timesteps:
        eps = torch.from_numpy(synthetic_eps(ref.scale_model_input(x, t).numpy(), float(t)))
        kwargs = {"generator": noises} if noises is not None else {}
        x = ref.step(eps, t, x, **kwargs).prev_sample
    return x.numpy()


def sdrt_loop(sampler: str, steps: int, x_start: np.ndarray, sigmas=None, **kwargs) -> np.ndarray:
    from sdrt.runtime import samplers
    from sdrt.runtime.options import SAMPLERS

    fn, rule = SAMPLERS[sampler]
    schedule = build_schedule(SchedulerConfig(**SD15), steps, rule, "automatic")
    table = dict(zip(schedule.sigmas[:-1].tolist(), schedule.timesteps.tolist(), strict=True))
    sigmas = schedule.sigmas if sigmas is None else sigmas

    def denoise(x, sigma):
        eps = synthetic_eps(x / np.float32(np.sqrt(1 + float(sigma) ** 2)), table[float(sigma)])
        return x - eps * np.float32(sigma)

    x = getattr(samplers, fn)(denoise, x_start * np.float32(schedule.initial_noise_scale), sigmas, **kwargs)
    return x / np.float32(np.sqrt(1 + float(sigmas[-1]) ** 2))


X_START = np.random.default_rng(0).standard_normal((2, 4, 5, 5)).astype(np.float32)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 20])
def test_plms_steps_match_pndm(steps):
    want = diffusers_loop("PNDMScheduler", steps, X_START, skip_prk_steps=True)
    np.testing.assert_allclose(sdrt_loop("PLMS", steps, X_START), want, atol=SAMPLER_ATOL, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 3, 6, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_orders_match_diffusers(order, steps):
    want = diffusers_loop("UniPCMultistepScheduler", steps, X_START, solver_order=order)
    got = sdrt_loop("UniPC", steps, X_START, order=order)
    np.testing.assert_allclose(got, want, atol=SAMPLER_ATOL, rtol=0)


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_bh1_matches_diffusers(order):
    """bh1 ends in NaN in diffusers at a zero final sigma (B(h) = -inf times 0): compare ending at sigma_min."""
    from sdrt.runtime.schedules import train_sigmas

    schedule = build_schedule(SchedulerConfig(**SD15), 10, "dpmsolver", "automatic")
    sigmas = schedule.sigmas.copy()
    sigmas[-1] = train_sigmas(SchedulerConfig(**SD15))[0]
    want = diffusers_loop(
        "UniPCMultistepScheduler", 10, X_START, solver_order=order, solver_type="bh1", final_sigmas_type="sigma_min"
    )
    got = sdrt_loop("UniPC", 10, X_START, sigmas=sigmas, order=order, variant="bh1")
    np.testing.assert_allclose(got, want, atol=SAMPLER_ATOL, rtol=0)
    assert np.abs(sdrt_loop("UniPC", 10, X_START, sigmas=sigmas, order=order) - want).max() > 100 * SAMPLER_ATOL


def test_unipc_corrector_would_be_caught():
    want = diffusers_loop("UniPCMultistepScheduler", 8, X_START)
    without_corrector = diffusers_loop("UniPCMultistepScheduler", 8, X_START, disable_corrector=list(range(8)))
    assert np.abs(sdrt_loop("UniPC", 8, X_START) - want).max() <= SAMPLER_ATOL
    assert np.abs(without_corrector - want).max() > 100 * SAMPLER_ATOL


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_steps_match_diffusers(steps):
    """LCM draws fresh noise after every step but the last: the same draws on both sides."""
    import torch

    generator = torch.Generator("cpu").manual_seed(3)
    want = diffusers_loop("LCMScheduler", steps, X_START, noises=generator)
    generator.manual_seed(3)
    schedule = build_schedule(SchedulerConfig(**SD15), steps, "lcm", "automatic")

    def noise():
        return torch.randn(X_START.shape, generator=generator).numpy()

    got = sdrt_loop("LCM", steps, X_START, noise=noise, timesteps=schedule.timesteps)
    np.testing.assert_allclose(got, want, atol=SAMPLER_ATOL, rtol=0)
