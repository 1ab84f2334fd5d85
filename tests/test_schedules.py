"""Schedules against diffusers' schedulers: same timesteps, sigmas and initial noise scale (float32 exact-ish)."""

import functools

import numpy as np
import pytest

from sdrt.runtime.manifest import SchedulerConfig
from sdrt.runtime.schedules import build_schedule, karras_sigmas, sigma_to_t, train_alphas_cumprod, train_sigmas

SD15 = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
)


def diffusers_scheduler(rule, spacing, karras):
    import diffusers

    cls = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler", "dpmsolver": "DPMSolverMultistepScheduler"}
    extra = {"use_karras_sigmas": True} if karras else {}
    return getattr(diffusers, cls[rule]).from_config({**SD15, "timestep_spacing": spacing}, **extra)


def test_alphas_cumprod_match_diffusers():
    import diffusers

    want = diffusers.DDIMScheduler(**SD15).alphas_cumprod.numpy()
    np.testing.assert_allclose(train_alphas_cumprod(SchedulerConfig(**SD15)), want, rtol=2e-6)


@pytest.mark.parametrize("steps", [1, 7, 20, 50])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize(
    ("rule", "karras"), [("euler", False), ("euler", True), ("dpmsolver", False), ("dpmsolver", True), ("ddim", False)]
)
def test_schedule_matches_diffusers(rule, karras, spacing, steps):
    cfg = SchedulerConfig(**SD15, timestep_spacing=spacing)
    ours = build_schedule(cfg, steps, rule, "karras" if karras else "automatic")
    ref = diffusers_scheduler(rule, spacing, karras)
    ref.set_timesteps(steps)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy().astype(np.float32), atol=2e-3)
    if rule == "ddim":
        acp = ref.alphas_cumprod.numpy()
        t = ref.timesteps.numpy()
        prev = t - 1000 // steps
        a = np.concatenate([acp[t], [acp[prev[-1]] if prev[-1] >= 0 else ref.final_alpha_cumprod.item()]])
        want_sigmas = np.sqrt((1 - a) / a)
        want_init = np.sqrt(1 + want_sigmas[0] ** 2)
    else:
        want_sigmas = ref.sigmas.numpy()
        sigma_max = float(want_sigmas.max())
        want_init = float(ref.init_noise_sigma) if rule == "euler" else np.sqrt(1 + sigma_max**2)
    np.testing.assert_allclose(ours.sigmas, want_sigmas, rtol=1e-5)
    assert ours.initial_noise_scale == pytest.approx(want_init, rel=1e-5)


def test_karras_formula():
    s = karras_sigmas(0.1, 10.0, 5, rho=7.0)
    assert s[0] == pytest.approx(10.0) and s[-1] == pytest.approx(0.1)
    inv = s ** (1 / 7)
    assert np.allclose(np.diff(inv), np.diff(inv)[0])  # evenly spaced in sigma^(1/rho)


def test_sigma_to_t_inverts_training_sigmas():
    sig = train_sigmas(SchedulerConfig(**SD15)).astype(np.float64)
    t = np.array([0, 1, 250, 999])
    np.testing.assert_allclose(sigma_to_t(sig[t], np.log(sig)), t, atol=1e-6)


def test_wrong_spacing_would_be_caught():
    leading = build_schedule(SchedulerConfig(**SD15, timestep_spacing="leading"), 20, "euler", "automatic")
    trailing = build_schedule(SchedulerConfig(**SD15, timestep_spacing="trailing"), 20, "euler", "automatic")
    assert np.abs(leading.timesteps - trailing.timesteps).max() > 10


# The UNet calls of sdrt's multi-stage and multistep samplers against diffusers' schedulers: the sigma the UNet input
# is scaled for and the UNet timestep of every call, the intermediate points of Heun, DPM2 and DPM2 a included.
EVALUATION_REFERENCES = {
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DPM++ 3M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
}
VP_INPUT_CLASSES = ("DPMSolverMultistepScheduler",)  # the UNet input is not rescaled: its sigmas are tested above


def sdrt_evaluations(sampler: str, cfg: SchedulerConfig, steps: int, scheduler: str) -> np.ndarray:
    """(calls, 2) float64: input scale 1/sqrt(sigma^2 + 1) and UNet timestep of each UNet call sdrt's SAMPLER makes."""
    from sdrt.runtime import samplers
    from sdrt.runtime.denoiser import Denoiser
    from sdrt.runtime.options import SAMPLERS

    fn, rule = SAMPLERS[sampler]
    sched = build_schedule(cfg, steps, rule, scheduler)
    table = dict(zip(sched.sigmas[:-1].tolist(), sched.timesteps.tolist(), strict=True))
    unet_side = Denoiser(None, "epsilon", train_sigmas(cfg), table, np.zeros((1, 1, 1), np.float32), None, 1.0)
    calls = []

    def denoise(x, sigma, intermediate=False):
        sigma32 = np.float32(sigma)
        calls.append((1 / np.sqrt(sigma32 * sigma32 + np.float32(1)), unet_side.timestep(sigma, intermediate)))
        return x * np.float32(0.5)

    x = np.ones((1, 1, 1, 1), np.float32)
    getattr(samplers, fn)(denoise, x, sched.sigmas, noise=lambda: np.zeros_like(x))
    return np.array(calls, dtype=np.float64)


@functools.cache
def reference_scheduler(cls_name: str, overrides: tuple, spacing: str, karras: bool):
    """A diffusers scheduler, made once: KDPM2's constructor alone takes half a second. set_timesteps resets it."""
    import diffusers

    extra = {"use_karras_sigmas": True} if karras else {}
    return getattr(diffusers, cls_name).from_config({**SD15, "timestep_spacing": spacing}, **dict(overrides), **extra)


def diffusers_evaluations(cls_name: str, overrides: dict, spacing: str, karras: bool, steps: int) -> np.ndarray:
    """The same for diffusers' scheduler, stepped as StableDiffusionPipeline steps it (a constant model output)."""
    import torch

    ref = reference_scheduler(cls_name, tuple(sorted(overrides.items())), spacing, karras)
    ref.set_timesteps(steps)
    x, calls = torch.ones(1, 1, 1, 1), []
    for t in ref.timesteps:
        calls.append((float(ref.scale_model_input(x, t).flatten()[0] / x.flatten()[0]), float(t)))
        x = ref.step(torch.full_like(x, 0.1), t, x).prev_sample
    return np.array(calls, dtype=np.float64)


@pytest.mark.parametrize("steps", [1, 3, 8, 20])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("karras", [False, True], ids=["automatic", "karras"])
@pytest.mark.parametrize("sampler", list(EVALUATION_REFERENCES))
def test_unet_calls_match_diffusers(sampler, karras, spacing, steps):
    cls_name, overrides = EVALUATION_REFERENCES[sampler]
    cfg = SchedulerConfig(**SD15, timestep_spacing=spacing)
    ours = sdrt_evaluations(sampler, cfg, steps, "karras" if karras else "automatic")
    ref = diffusers_evaluations(cls_name, overrides, spacing, karras, steps)
    assert ours.shape == ref.shape  # as many UNet calls (2 per step for Heun and DPM2*, but 1 on the last)
    np.testing.assert_allclose(ours[:, 1], ref[:, 1], atol=1e-3)  # measured: up to 6e-4 (float32 log sigmas)
    if cls_name not in VP_INPUT_CLASSES:
        np.testing.assert_allclose(ours[:, 0], ref[:, 0], rtol=3e-6)  # measured: up to 1.3e-6


def test_intermediate_timestep_would_be_caught():
    """DPM2 a's midpoint (eta 1) lands on the next sigma; diffusers gives it sigma_to_t's timestep, not the table's."""
    cfg = SchedulerConfig(**SD15, timestep_spacing="linspace")
    ours = sdrt_evaluations("DPM2 a", cfg, 8, "karras")
    ref = diffusers_evaluations(*EVALUATION_REFERENCES["DPM2 a"], "linspace", True, 8)
    midpoints = ref[1::2, 1]
    assert np.abs(midpoints - midpoints.round()).max() > 0.1  # fractional there, so a table lookup would miss
    np.testing.assert_allclose(ours[1::2, 1], midpoints, atol=1e-3)
