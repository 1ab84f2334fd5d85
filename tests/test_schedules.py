"""Schedules against diffusers' schedulers: same timesteps, sigmas and initial noise scale (float32 exact-ish)."""

import functools

import numpy as np
import pytest
from tiny_sd import SD15_SCHEDULER_KWARGS

from sdrt.runtime.manifest import SchedulerConfig
from sdrt.runtime.schedules import build_schedule, karras_sigmas, sigma_to_t, train_alphas_cumprod, train_sigmas

SD15 = SD15_SCHEDULER_KWARGS


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
    from sdrt.runtime.denoiser import Denoiser, TextConditioning
    from sdrt.runtime.options import SAMPLERS

    fn, rule = SAMPLERS[sampler]
    sched = build_schedule(cfg, steps, rule, scheduler)
    table = dict(zip(sched.sigmas[:-1].tolist(), sched.timesteps.tolist(), strict=True))
    unet_side = Denoiser(None, "epsilon", train_sigmas(cfg), table, TextConditioning.fixed({}, False), 1.0)
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


# Schedule types, PLMS/UniPC/LCM timestep rules, timestep_spacing and zero terminal SNR (test_parity_multistep.py
# checks the images these give).
RANGE_CLASSES = {  # diffusers classes with use_exponential_sigmas / use_beta_sigmas -> sdrt rule
    "EulerDiscreteScheduler": "euler",
    "DPMSolverMultistepScheduler": "dpmsolver",
    "UniPCMultistepScheduler": "dpmsolver",
}


@pytest.mark.parametrize("steps", [2, 7, 20, 50])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("scheduler", ["automatic", "karras", "exponential", "beta"])
@pytest.mark.parametrize("cls_name", list(RANGE_CLASSES))
def test_schedule_types_match_diffusers(cls_name, scheduler, spacing, steps):
    """Timesteps exactly (DPMSolver/UniPC truncate exponential and beta ones to integers), sigmas to float32."""
    import diffusers

    extra = {} if scheduler == "automatic" else {f"use_{scheduler}_sigmas": True}
    ref = getattr(diffusers, cls_name).from_config({**SD15, "timestep_spacing": spacing}, **extra)
    ref.set_timesteps(steps)
    ours = build_schedule(SchedulerConfig(**SD15, timestep_spacing=spacing), steps, RANGE_CLASSES[cls_name], scheduler)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy().astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-5)
    euler = cls_name == "EulerDiscreteScheduler"
    want_init = float(ref.init_noise_sigma) if euler else np.sqrt(1 + ours.sigmas[0] ** 2)
    assert ours.initial_noise_scale == pytest.approx(want_init, rel=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_plms_schedule_matches_pndm(spacing, steps):
    """PNDM (skip_prk_steps) calls the UNet at its spaced timesteps, the second one twice; it ends at alpha_bar[0]."""
    import diffusers

    ref = diffusers.PNDMScheduler.from_config({**SD15, "timestep_spacing": spacing}, skip_prk_steps=True)
    ref.set_timesteps(steps)
    ours = build_schedule(SchedulerConfig(**SD15, timestep_spacing=spacing), steps, "pndm", "automatic")
    np.testing.assert_array_equal(ours.timesteps, ref._timesteps[::-1].astype(np.float32))
    assert list(ref.timesteps.numpy()) == [*ours.timesteps[:2], *ours.timesteps[1:]][: len(ref.timesteps)]
    acp = ref.alphas_cumprod.numpy().astype(np.float64)
    a = np.append(acp[ref._timesteps[::-1]], ref.final_alpha_cumprod.item())
    np.testing.assert_allclose(ours.sigmas, np.sqrt((1 - a) / a), rtol=1e-5)
    assert ours.initial_noise_scale == pytest.approx(np.sqrt(1 + ours.sigmas[0] ** 2), rel=1e-6)  # init_noise_sigma 1


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 13, 50])
def test_lcm_schedule_matches_diffusers(steps):
    import diffusers

    ref = diffusers.LCMScheduler.from_config(SD15)
    ref.set_timesteps(steps)
    ours = build_schedule(SchedulerConfig(**SD15), steps, "lcm", "automatic")
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.float32))
    acp = ref.alphas_cumprod.numpy().astype(np.float64)[ref.timesteps.numpy()]
    np.testing.assert_allclose(ours.sigmas, np.append(np.sqrt((1 - acp) / acp), 0.0), rtol=1e-5)
    with pytest.raises(ValueError, match="LCM takes 1 to 50 steps"):
        build_schedule(SchedulerConfig(**SD15), 51, "lcm", "automatic")


def log_interp_sigma(t: float, sig: np.ndarray) -> float:
    """k-diffusion's t_to_sigma, written out: log sigma linear between the two training timesteps around t."""
    low, w = int(np.floor(t)), t - np.floor(t)
    high = min(low + 1, len(sig) - 1)
    return float(np.exp((1 - w) * np.log(sig[low]) + w * np.log(sig[high])))


@pytest.mark.parametrize("steps", [1, 3, 7, 20])
@pytest.mark.parametrize("rule", ["euler", "ddim", "dpmsolver", "pndm", "lcm"])
def test_a1111_training_grid_schedules_by_hand(rule, steps):
    """A1111's uniform, sgm_uniform and simple (sd_schedulers.py) lie on the training timesteps whatever the sampler."""
    sig = train_sigmas(SchedulerConfig(**SD15)).astype(np.float64)
    want_t = {
        "uniform": [999 - 999 * i / (steps - 1) for i in range(steps)] if steps > 1 else [999.0],
        "sgm_uniform": [999 - 999 * i / steps for i in range(steps)],
        "simple": [999 - int(i * 1000 / steps) for i in range(steps)],
    }
    for scheduler, t in want_t.items():
        ours = build_schedule(SchedulerConfig(**SD15), steps, rule, scheduler)
        np.testing.assert_allclose(ours.timesteps, t, atol=1e-4)
        np.testing.assert_allclose(ours.sigmas, [*(log_interp_sigma(x, sig) for x in t), 0.0], rtol=1e-6)
        want_init = ours.sigmas[0] if rule == "euler" else np.sqrt(1 + ours.sigmas[0] ** 2)  # k-diffusion: sigma_max
        assert ours.initial_noise_scale == pytest.approx(float(want_init), rel=1e-6)


@pytest.mark.parametrize("steps", [2, 7, 20])
@pytest.mark.parametrize("rule", ["ddim", "pndm", "lcm"])
def test_range_schedules_without_diffusers_option_by_hand(rule, steps):
    """DDIM, PNDM and LCM have no use_*_sigmas: exponential and beta span their spaced sigmas, as Karras does."""
    import scipy.stats

    cfg = SchedulerConfig(**SD15)
    spaced = build_schedule(cfg, steps, rule, "automatic").sigmas.astype(np.float64)
    hi, lo = spaced[0], spaced[steps - 1]
    exponential = np.exp(np.linspace(np.log(hi), np.log(lo), steps))
    beta = lo + scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps), 0.6, 0.6) * (hi - lo)
    log_sigmas = np.log(train_sigmas(cfg).astype(np.float64))
    for scheduler, want in (("exponential", exponential), ("beta", beta)):
        ours = build_schedule(cfg, steps, rule, scheduler)
        np.testing.assert_allclose(ours.sigmas, np.append(want, 0.0), rtol=1e-6)
        np.testing.assert_allclose(ours.timesteps, sigma_to_t(want, log_sigmas), atol=1e-3)  # fractional
    if steps > 2:  # two points are the range's ends under every formula
        assert np.abs(build_schedule(cfg, steps, rule, "beta").sigmas - np.append(exponential, 0)).max() > 0.1


def test_beta_ppf_matches_scipy():
    import scipy.stats

    from sdrt.runtime.schedules import beta_ppf, betainc

    q = np.array([0.0, 1e-12, 1e-6, 0.01, 0.2, 0.5, 0.77, 0.999, 1 - 1e-9, 1.0])
    for a, b in ((0.6, 0.6), (0.5, 2.0), (3.0, 0.7), (1.0, 1.0)):
        np.testing.assert_allclose(beta_ppf(q, a, b), scipy.stats.beta.ppf(q, a, b), atol=1e-12)
        x = np.linspace(0, 1, 41)
        np.testing.assert_allclose(betainc(a, b, x), scipy.stats.beta.cdf(x, a, b), atol=1e-13)


def test_timestep_spacing_option_replaces_the_config():
    for spacing in ("leading", "linspace", "trailing"):
        for rule in ("euler", "ddim", "dpmsolver", "pndm"):
            by_option = build_schedule(SchedulerConfig(**SD15), 9, rule, "automatic", timestep_spacing=spacing)
            by_config = build_schedule(SchedulerConfig(**SD15, timestep_spacing=spacing), 9, rule, "automatic")
            np.testing.assert_array_equal(by_option.sigmas, by_config.sigmas)
            np.testing.assert_array_equal(by_option.timesteps, by_config.timesteps)


def test_which_schedules_use_the_spacing():
    from sdrt.runtime.schedules import SCHEDULES, uses_spacing

    cfg = SchedulerConfig(**SD15)
    for rule in ("euler", "ddim", "dpmsolver", "pndm", "lcm"):
        for scheduler in SCHEDULES:
            schedules = [
                build_schedule(cfg, 9, rule, scheduler, timestep_spacing=s).sigmas for s in ("leading", "trailing")
            ]
            assert uses_spacing(rule, scheduler) == (not np.array_equal(*schedules)), (rule, scheduler)


@pytest.mark.parametrize(
    ("cls_name", "rule"),
    [("EulerDiscreteScheduler", "euler"), ("DDIMScheduler", "ddim"), ("UniPCMultistepScheduler", "dpmsolver")],
)
def test_zero_terminal_snr_schedule_matches_diffusers(cls_name, rule):
    """Lin et al. 2023: rescaled betas put the last training timestep at SNR 2**-24 (sigma 4096), where trailing
    spacing starts."""
    import diffusers

    zero_snr = {**SD15, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    ref = getattr(diffusers, cls_name).from_config(zero_snr)
    ref.set_timesteps(10)
    ours = build_schedule(SchedulerConfig(**zero_snr), 10, rule, "automatic")
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy().astype(np.float32))
    assert ours.sigmas[0] == pytest.approx(4096, rel=1e-4)  # sqrt((1 - 2**-24) / 2**-24)
    if cls_name == "DDIMScheduler":  # DDIM keeps alpha_bar = 0 at t = 999 (sigma inf); the step is the same limit
        acp = ref.alphas_cumprod.numpy().astype(np.float64)[ref.timesteps.numpy()[1:]]
        np.testing.assert_allclose(ours.sigmas[1:-1], np.sqrt((1 - acp) / acp), rtol=1e-5)
    else:
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-5)
    plain = build_schedule(SchedulerConfig(**SD15, timestep_spacing="trailing"), 10, rule, "automatic")
    assert plain.sigmas[0] < 15  # the flag would be caught
