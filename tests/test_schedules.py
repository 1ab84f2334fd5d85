"""Schedules against diffusers' schedulers: same timesteps, sigmas and initial noise scale (float32 exact-ish)."""

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
