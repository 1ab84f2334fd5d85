"""k-diffusion's samplers (Heun, DPM2, DPM2 a, LMS, DPM++ 2S a, DPM++ SDE, DPM++ 2M SDE, DPM++ 3M SDE, Euler churn).

Where diffusers runs the same algorithm, sdrt's images must match its StableDiffusionPipeline on the tiny model (same
weights and seeds) to PIXEL_TOL, and final latents to LATENT_ATOL. Where it does not (DPM++ 2S a; DPM++ SDE, whose
diffusers class draws from torchsde's Brownian tree; DPM++ 3M SDE past its third step; Euler/Heun churn), sdrt's
steps are checked against values worked out here from the published formulas, written in the variance-preserving
notation of Lu et al. 2022 (alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t)) rather than sdrt's sigma-only form,
to FORMULA_RTOL; each such check also shows that a plausible wrong step misses it.
"""

import math

import numpy as np
import pytest
from diffusers_reference import LATENT_RTOL, diffusers_run
from test_parity import NEGATIVE, PIXEL_TOL, PROMPT, max_diff, sdrt_run
from tiny_sd import SD15_SCHEDULER_KWARGS

from sdrt.runtime import samplers
from sdrt.runtime.denoiser import Denoiser, TextConditioning
from sdrt.runtime.manifest import SchedulerConfig
from sdrt.runtime.options import SAMPLERS, resolve_sampler
from sdrt.runtime.schedules import build_schedule, train_sigmas

DIFFUSERS_PARITY = ["Heun", "DPM2", "DPM2 a", "LMS", "DPM++ 2M SDE"]
CASES = {  # (width, height, seeds, cfg_scale): guidance on and off, batch 1 and 2
    "b1-cfg": (64, 64, (7,), 7.0),
    "b2-cfg": (80, 64, (3, 4), 5.0),
    "b2-nocfg": (64, 72, (11, 12), 1.0),
}
FORMULA_RTOL = 1e-5  # float32 sampler against float64 hand arithmetic; measured below 1e-6
SD15 = dict(SD15_SCHEDULER_KWARGS, timestep_spacing="linspace")
# diffusers' DPMSolverMultistepScheduler(sde-dpmsolver++, solver_order=3) is k-diffusion's DPM++ 3M SDE only for its
# first three steps, and only with solver_type="heun": its third-order update has the D2 coefficient 1 lower than
# k-diffusion's (and Lu et al.'s ODE form), and with fewer than 15 steps it uses second order on the next-to-last step.
DPMPP_3M_SDE_PREFIX = ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                                                        "solver_type": "heun"})  # fmt: skip
DPMPP_3M_SDE_PREFIX_STEPS = 3


def parity_kwargs(sampler, scheduler, case):
    width, height, seeds, cfg_scale = CASES[case]
    kw = dict(negative_prompt=NEGATIVE, width=width, height=height, steps=8, cfg_scale=cfg_scale)
    return seeds, {**kw, "sampler": sampler, "scheduler": scheduler}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("scheduler", ["automatic", "karras"])
@pytest.mark.parametrize("sampler", DIFFUSERS_PARITY)
def test_images_match_diffusers_same_seed(tiny_sd, tiny_pipeline, sampler, scheduler, case):
    seeds, kw = parity_kwargs(sampler, scheduler, case)
    want = diffusers_run(tiny_sd[0], PROMPT, seeds=seeds, **kw)
    got = sdrt_run(tiny_pipeline, list(seeds), **kw)
    assert got.shape == want.shape
    assert max_diff(got, want) <= PIXEL_TOL  # measured: 1


@pytest.mark.parametrize("scheduler", ["automatic", "karras"])
@pytest.mark.parametrize("sampler", DIFFUSERS_PARITY)
def test_latents_match_diffusers_given_latents(tiny_sd, tiny_pipeline, sampler, scheduler, latent_atol):
    latents = np.random.default_rng(5).standard_normal((2, 4, 8, 10)).astype(np.float32)
    kw = dict(negative_prompt=NEGATIVE, width=80, height=64, steps=8, cfg_scale=6.0, sampler=sampler)
    kw.update(scheduler=scheduler, latents=latents)
    want = diffusers_run(tiny_sd[0], PROMPT, seeds=(21, 22), output_type="latent", **kw)
    got = sdrt_run(tiny_pipeline, [21, 22], output_type="latent", **kw)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=latent_atol, rtol=LATENT_RTOL)


@pytest.mark.parametrize("scheduler", ["automatic", "karras"])
def test_dpmpp_3m_sde_first_steps_match_diffusers(tiny_sd, tiny_pipeline, scheduler):
    """First, second order and the final x = D(x): where diffusers' class runs k-diffusion's algorithm."""
    seeds, kw = parity_kwargs("DPM++ 3M SDE", scheduler, "b2-cfg")
    kw["steps"] = DPMPP_3M_SDE_PREFIX_STEPS
    want = diffusers_run(tiny_sd[0], PROMPT, seeds=seeds, reference=DPMPP_3M_SDE_PREFIX, **kw)
    assert max_diff(sdrt_run(tiny_pipeline, list(seeds), **kw), want) <= PIXEL_TOL  # measured: 1


WRONG_SAMPLER = {  # sdrt's sampler -> a related diffusers one it must not pass for
    "Heun": "Euler",
    "DPM2": "Heun",
    "DPM2 a": "DPM2",
    "LMS": "Euler",
    "DPM++ 2M SDE": "DPM++ 2M",
}


@pytest.mark.parametrize("sampler", list(WRONG_SAMPLER))
def test_parity_can_fail(tiny_sd, tiny_pipeline, sampler):
    """A wrong sampler (measured: 15/255 for LMS vs Euler, 56 to 101/255 for the others) fails the checks above."""
    seeds, kw = parity_kwargs(sampler, "automatic", "b1-cfg")
    want = diffusers_run(tiny_sd[0], PROMPT, seeds=seeds, **{**kw, "sampler": WRONG_SAMPLER[sampler]})
    assert max_diff(sdrt_run(tiny_pipeline, list(seeds), **kw), want) > 4 * PIXEL_TOL


def test_churn_reaches_euler_and_heun(tiny_pipeline):
    """s_churn changes Euler's and Heun's images; outside [s_tmin, s_tmax] it does nothing."""
    kw = dict(width=64, height=64, steps=6, cfg_scale=7.0)
    for sampler in ("Euler", "Heun"):
        plain = sdrt_run(tiny_pipeline, [5], sampler=sampler, **kw)
        churned = sdrt_run(tiny_pipeline, [5], sampler=sampler, s_churn=1.0, **kw)
        gated = sdrt_run(tiny_pipeline, [5], sampler=sampler, s_churn=1.0, s_tmin=50.0, **kw)
        assert max_diff(plain, churned) > 4 * PIXEL_TOL
        assert max_diff(plain, gated) == 0


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("k_heun", ("Heun", "automatic")),
        ("k_dpm_2", ("DPM2", "automatic")),
        ("k_dpm_2_a", ("DPM2 a", "automatic")),
        ("k_lms", ("LMS", "automatic")),
        ("k_dpmpp_2s_a", ("DPM++ 2S a", "automatic")),
        ("k_dpmpp_sde", ("DPM++ SDE", "automatic")),
        ("k_dpmpp_2m_sde", ("DPM++ 2M SDE", "automatic")),
        ("k_dpmpp_3m_sde", ("DPM++ 3M SDE", "automatic")),
        ("LMS Karras", ("LMS", "karras")),
        ("DPM2 Karras", ("DPM2", "karras")),
        ("DPM2 a Karras", ("DPM2 a", "karras")),
        ("DPM++ 2S a Karras", ("DPM++ 2S a", "karras")),
        ("DPM++ SDE Karras", ("DPM++ SDE", "karras")),
        ("DPM++ 2M SDE Karras", ("DPM++ 2M SDE", "karras")),
        ("DPM++ 3M SDE Karras", ("DPM++ 3M SDE", "karras")),
    ],
)
def test_a1111_aliases_and_legacy_names(name, want):
    assert resolve_sampler(name, "automatic") == want


# --- Against the published formulas -------------------------------------------------------------------------------


def vp(sigma: float) -> tuple[float, float, float]:
    """(alpha_t, sigma_t, lambda_t) of the variance-preserving process whose x / alpha_t has noise level SIGMA."""
    alpha = 1 / math.sqrt(1 + sigma**2)
    return alpha, sigma * alpha, math.log(alpha / (sigma * alpha))


def toy(x, sigma: float):
    """A smooth made-up x0 estimate D(x, sigma), in x's precision."""
    return x * (0.4 / (1 + sigma)) + 0.3 * math.sin(2 * sigma)


def toy_denoiser(calls=None):
    """The toy D as sdrt's samplers call it (float32), recording (sigma, intermediate) of each call in CALLS."""

    def denoise(x, sigma, intermediate=False):
        if calls is not None:
            calls.append((float(sigma), intermediate))
        return toy(x, float(sigma)).astype(np.float32)

    return denoise


def exact(x, sigma: float):
    """The toy D in float64: the hand computations' precision."""
    return toy(np.asarray(x, np.float64), sigma)


def unit_noises(count: int, shape=(2, 4, 3, 3), seed=0):
    """COUNT fixed unit-normal float32 arrays, and a noise() that hands them out in order."""
    zs = [np.random.default_rng(seed + k).standard_normal(shape).astype(np.float32) for k in range(count)]
    queue = list(zs)
    return zs, (lambda: queue.pop(0))


def sd15_train_sigmas() -> np.ndarray:
    """(1000,) sqrt((1 - alpha_bar) / alpha_bar) of SD 1.x's DDPM schedule: betas evenly spaced in sqrt(beta)."""
    betas = np.linspace(SD15["beta_start"] ** 0.5, SD15["beta_end"] ** 0.5, 1000) ** 2
    alpha_bar = np.cumprod(1 - betas)
    return np.sqrt((1 - alpha_bar) / alpha_bar)


def sd15_sigmas(steps: int, scheduler: str) -> np.ndarray:
    """Euler-rule sigmas worked out from the formulas: linspace timesteps over the SD 1.x training sigmas (DDPM's
    scaled_linear betas), interpolated linearly in t; or Karras et al. 2022's eq. 5 over their range; then 0."""
    t = np.linspace(0, 999, steps)[::-1]
    sigmas = np.interp(t, np.arange(1000), sd15_train_sigmas())
    if scheduler == "karras":
        rho, ramp = 7.0, np.linspace(0, 1, steps)
        sigmas = (sigmas[0] ** (1 / rho) + ramp * (sigmas[-1] ** (1 / rho) - sigmas[0] ** (1 / rho))) ** rho
    return np.append(sigmas, 0.0)


def ancestral(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): the noise a DDPM posterior step from SIGMA to SIGMA_NEXT adds, scaled by eta."""
    up = min(sigma_next, eta * sigma_next * math.sqrt(1 - (sigma_next / sigma) ** 2))
    return math.sqrt(sigma_next**2 - up**2), up


def dpm_solver_pp_1(x, denoised, sigma: float, sigma_to: float):
    """DPM-Solver++ first-order step (Lu et al. 2022, eq. 8 / DDIM) from SIGMA to SIGMA_TO, in VP units and back."""
    alpha_s, sig_s, lam_s = vp(sigma)
    alpha_t, sig_t, lam_t = vp(sigma_to)
    h = lam_t - lam_s
    x_t = (sig_t / sig_s) * (alpha_s * x) - alpha_t * (math.exp(-h) - 1) * denoised
    return x_t / alpha_t


@pytest.mark.parametrize("scheduler", ["automatic", "karras"])
@pytest.mark.parametrize("sampler", ["DPM++ 2S a", "DPM++ SDE"])
def test_sigmas_and_unet_calls_by_hand(sampler, scheduler):
    """The sigmas, each UNet call's sigma and its timestep: schedule points, then the lambda-midpoint of each step
    (2S a: of sigma and sigma_down; SDE: of sigma and sigma_next), whose timestep interpolates log sigma."""
    steps = 8
    cfg = SchedulerConfig(**SD15)
    fn, rule = SAMPLERS[sampler]
    sched = build_schedule(cfg, steps, rule, scheduler)
    want = sd15_sigmas(steps, scheduler)
    np.testing.assert_allclose(sched.sigmas, want, rtol=2e-5)  # sdrt (as diffusers) takes alpha_bar in float32
    calls = []
    x = np.ones((1, 4, 2, 2), np.float32)
    getattr(samplers, fn)(toy_denoiser(calls), x * want[0], sched.sigmas, noise=lambda: np.zeros_like(x))
    want_calls = []
    for i in range(steps):
        want_calls.append((want[i], False))
        if want[i + 1] > 0:  # the stage-2 point: lambda halfway to sigma_down (2S a) or to sigma_next (SDE)
            target = ancestral(want[i], want[i + 1])[0] if sampler == "DPM++ 2S a" else want[i + 1]
            want_calls.append((math.exp((math.log(want[i]) + math.log(target)) / 2), True))
    assert [flag for _, flag in calls] == [flag for _, flag in want_calls]
    np.testing.assert_allclose([s for s, _ in calls], [s for s, _ in want_calls], rtol=2e-5)
    # UNet timesteps: the schedule's for its sigmas; at a midpoint, t where log sigma interpolates linearly between
    # the training sigmas of the two neighbouring integer timesteps
    table = dict(zip(sched.sigmas[:-1].tolist(), sched.timesteps.tolist(), strict=True))
    unet_side = Denoiser(None, "epsilon", train_sigmas(cfg), table, TextConditioning.fixed({}, False), 1.0)
    log_train = np.log(sd15_train_sigmas())  # increasing in t
    for (sigma, intermediate), (want_sigma, _) in zip(calls, want_calls, strict=True):
        if intermediate:
            low = int(np.searchsorted(log_train, math.log(want_sigma))) - 1
            want_t = low + (math.log(want_sigma) - log_train[low]) / (log_train[low + 1] - log_train[low])
        else:
            want_t = float(sched.timesteps[list(sched.sigmas).index(np.float32(sigma))])
        assert unet_side.timestep(sigma, intermediate) == pytest.approx(want_t, abs=3e-3)  # float32 alpha_bar: 1.4e-3


def test_dpmpp_2s_ancestral_step_by_hand():
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1, r = 1/2) to sigma_down, then sigma_up of fresh noise."""
    sigmas = sd15_sigmas(8, "karras").astype(np.float32)
    denoise = toy_denoiser()
    for i in (0, 4):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x = unit_noises(1, seed=1)[0][0] * np.float32(sigma)
        (z,), noise = unit_noises(1, seed=10)
        got = samplers.sample_dpmpp_2s_ancestral(denoise, x, sigmas[i : i + 2], noise=noise)
        down, up = ancestral(sigma, sigma_next)
        lam_s, lam_down = vp(sigma)[2], vp(down)[2]
        sigma_mid = math.exp(-(lam_s + (lam_down - lam_s) / 2))
        u = dpm_solver_pp_1(x, exact(x, sigma), sigma, sigma_mid)
        want = dpm_solver_pp_1(x, exact(u, sigma_mid), sigma, down) + up * z
        tol = FORMULA_RTOL * np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=FORMULA_RTOL, atol=tol)
        # can fail: Euler ancestral's first-order step from the same point, with the same noise, misses by far more
        euler_a = samplers.sample_euler_ancestral(denoise, x, sigmas[i : i + 2], noise=unit_noises(1, seed=10)[1])
        assert np.abs(euler_a - want).max() > 100 * tol


def test_dpmpp_sde_step_by_hand():
    """DPM-Solver++ SDE (k-diffusion, r = 1/2): an ancestral DPM-Solver++ step to the lambda-midpoint, then one over
    the whole step with the midpoint's D; both noises are increments of one Brownian path in sigma."""
    sigmas = sd15_sigmas(8, "automatic").astype(np.float32)
    denoise = toy_denoiser()
    for i in (0, 5):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x = unit_noises(1, seed=3)[0][0] * np.float32(sigma)
        (z1, z2), noise = unit_noises(2, seed=20)
        got = samplers.sample_dpmpp_sde(denoise, x, sigmas[i : i + 2], noise=noise)
        lam_s, lam_t = vp(sigma)[2], vp(sigma_next)[2]
        sigma_mid = math.exp(-(lam_s + (lam_t - lam_s) / 2))
        down, up = ancestral(sigma, sigma_mid)
        u = dpm_solver_pp_1(x, exact(x, sigma), sigma, down) + up * z1
        # W(sigma_next) - W(sigma) = [W(sigma_mid) - W(sigma)] + [W(sigma_next) - W(sigma_mid)], normalised
        w = (z1 * math.sqrt(sigma - sigma_mid) + z2 * math.sqrt(sigma_mid - sigma_next)) / math.sqrt(sigma - sigma_next)
        down, up = ancestral(sigma, sigma_next)
        want = dpm_solver_pp_1(x, exact(u, sigma_mid), sigma, down) + up * w
        tol = FORMULA_RTOL * np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=FORMULA_RTOL, atol=tol)
        # can fail: independent noise for the whole step (not on the stage-1 path) misses
        assert np.abs(got - (want - up * w + up * z2)).max() > 100 * tol


def test_dpmpp_3m_sde_steps_by_hand():
    """SDE-DPM-Solver++ (Lu et al. 2022) with eta = 1 as k-diffusion's sample_dpmpp_3m_sde: first order, then second
    (the multistep D1 with the phi_2 weight), then third order (D1, D2 of the last three denoised values)."""
    sigmas = sd15_sigmas(8, "karras")[:5].astype(np.float32)  # four steps, none to sigma 0
    x0 = unit_noises(1, seed=30)[0][0] * sigmas[0]
    noises, noise = unit_noises(4, seed=40)
    trace = []
    samplers.sample_dpmpp_3m_sde(toy_denoiser(), x0, sigmas, noise=noise, callback=lambda i, x, d: trace.append(x))
    s = [float(v) for v in sigmas]
    x, history, wrong_d2 = np.asarray(x0, np.float64), [], None
    for i in range(4):
        alpha_s, sig_s, lam_s = vp(s[i])
        alpha_t, sig_t, lam_t = vp(s[i + 1])
        h = lam_t - lam_s
        m0 = exact(x, s[i])
        x_vp = (sig_t / sig_s) * math.exp(-h) * (alpha_s * x) + alpha_t * (1 - math.exp(-2 * h)) * m0
        heun_weight = alpha_t * ((1 - math.exp(-2 * h)) / (-2 * h) + 1)
        if len(history) == 1:
            (m1, h0) = history[0]
            x_vp += heun_weight * (m0 - m1) * (h / h0)
        elif len(history) == 2:
            (m1, h0), (m2, h1) = history[-1], history[-2]
            r0, r1 = h0 / h, h1 / h
            d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
            d1, d2 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)
            d2_weight = alpha_t * (0.5 - (math.exp(-2 * h) - 1 + 2 * h) / (2 * h) ** 2)
            x_vp += heun_weight * d1 + d2_weight * d2
            wrong_d2 = alpha_t * d2  # diffusers' sde-dpmsolver++ third order: its D2 weight is lower by alpha_t
        x_vp += sig_t * math.sqrt(1 - math.exp(-2 * h)) * noises[i]
        x = x_vp / alpha_t
        history = [*history[-1:], (m0, h)]
        tol = FORMULA_RTOL * np.abs(x).max()
        np.testing.assert_allclose(trace[i], x, rtol=FORMULA_RTOL, atol=tol)
    # can fail: the third-order steps with diffusers' D2 weight miss (last step alone; the error compounds)
    assert np.abs(trace[-1] - (x - wrong_d2 / vp(s[4])[0])).max() > 100 * tol


@pytest.mark.parametrize("sampler", ["Euler", "Heun"])
def test_churn_by_hand(sampler):
    """Karras et al. 2022, Alg. 2: gamma = min(s_churn / steps, sqrt 2 - 1) inside [s_tmin, s_tmax], sigma_hat =
    (1 + gamma) sigma, x_hat = x + sqrt(sigma_hat^2 - sigma^2) s_noise eps; then the Euler / Heun step from sigma_hat.
    k-diffusion draws eps on every step (also where gamma is 0), so step i churns with the i-th draw."""
    sigmas = sd15_sigmas(8, "automatic").astype(np.float32)
    denoise = toy_denoiser()
    fn = samplers.sample_euler if sampler == "Euler" else samplers.sample_heun
    s_churn, s_noise = 2.0, 0.9
    s_tmax = float(sigmas[1]) * 1.01  # step 0 outside [s_tmin, s_tmax]: no churn, though it still draws
    x0 = unit_noises(1, seed=50)[0][0] * sigmas[0]
    zs, noise = unit_noises(8, seed=60)
    trace = []
    fn(denoise, x0, sigmas, noise=noise, s_churn=s_churn, s_tmax=s_tmax, s_noise=s_noise,
       callback=lambda i, x, d: trace.append(x))  # fmt: skip
    x = np.asarray(x0, np.float64)
    for i in range(2):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(s_churn / 8, 2**0.5 - 1) if sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * zs[i]
        slope = (x - exact(x, sigma_hat)) / sigma_hat
        x_euler = x + slope * (sigma_next - sigma_hat)
        if sampler == "Heun":
            slope_next = (x_euler - exact(x_euler, sigma_next)) / sigma_next
            x_euler = x + (slope + slope_next) / 2 * (sigma_next - sigma_hat)
        x = x_euler
        np.testing.assert_allclose(trace[i], x, rtol=FORMULA_RTOL, atol=FORMULA_RTOL * np.abs(x).max())
    # can fail: without churn the second step differs by far more
    trace_plain = []
    fn(denoise, x0, sigmas, noise=unit_noises(8, seed=60)[1], callback=lambda i, x, d: trace_plain.append(x))
    assert np.abs(trace_plain[1] - x).max() > 100 * FORMULA_RTOL * np.abs(x).max()


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_coefficients_integrate_polynomials_exactly(order):
    """Linear multistep weights: sum_j w_j p(sigma_(i-j)) = integral of p over [sigma_i, sigma_(i+1)] for any
    polynomial p of degree < order (what integrating the Lagrange basis means), on the real, uneven sigma grid."""
    sigmas = sd15_sigmas(10, "karras")
    i = 5
    weights = samplers.lms_coefficients(sigmas, i, order)
    nodes = sigmas[i - order + 1 : i + 1][::-1]
    for degree in range(order):
        p = np.polynomial.Polynomial(np.random.default_rng(degree).standard_normal(degree + 1))
        integral = p.integ()(sigmas[i + 1]) - p.integ()(sigmas[i])
        assert float(np.dot(weights, p(nodes))) == pytest.approx(integral, rel=1e-9, abs=1e-12)
    if order > 1:  # can fail: one degree higher is not integrated exactly
        p = np.polynomial.Polynomial.fromroots(nodes)
        integral = p.integ()(sigmas[i + 1]) - p.integ()(sigmas[i])
        assert abs(float(np.dot(weights, p(nodes))) - integral) > 1e-3 * abs(integral)


def test_dpmpp_sde_matches_diffusers_with_the_same_brownian_path(tiny_sd, tiny_pipeline):
    """Where torchsde is installed: diffusers' DPMSolverSDEScheduler with its Brownian tree replaced by the path sdrt
    builds from the per-image generators (the stage-1 increment, then the rest of the step)."""
    pytest.importorskip("torchsde")
    import diffusers
    import torch

    pipe = tiny_sd[0]
    seeds, kw = parity_kwargs("DPM++ SDE", "karras", "b2-cfg")
    width, height = kw["width"], kw["height"]
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]

    class SamePath:
        def __init__(self):
            self.stage_1 = None

        def draw(self):
            return torch.cat([torch.randn((1, 4, height // 8, width // 8), generator=g) for g in generators])

        def __call__(self, sigma, sigma_to):
            sigma, sigma_to = float(sigma), float(sigma_to)
            if self.stage_1 is not None and self.stage_1[0] == sigma and sigma_to < self.stage_1[1]:
                _, sigma_mid, z1 = self.stage_1
                self.stage_1 = None
                first, rest = sigma - sigma_mid, sigma_mid - sigma_to
                return (z1 * first**0.5 + self.draw() * rest**0.5) / (first + rest) ** 0.5
            self.stage_1 = (sigma, sigma_to, self.draw())
            return self.stage_1[2]

    if not hasattr(pipe, "base_scheduler_config"):
        pipe.base_scheduler_config = dict(pipe.scheduler.config)
    scheduler = diffusers.DPMSolverSDEScheduler.from_config(pipe.base_scheduler_config, use_karras_sigmas=True)
    set_timesteps = scheduler.set_timesteps

    def set_timesteps_same_path(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        scheduler.noise_sampler = SamePath()

    scheduler.set_timesteps = set_timesteps_same_path
    pipe.scheduler = scheduler
    out = pipe(PROMPT, negative_prompt=NEGATIVE, width=width, height=height, num_inference_steps=kw["steps"],
               guidance_scale=kw["cfg_scale"], generator=generators, num_images_per_prompt=len(seeds),
               output_type="np")  # fmt: skip
    want = (out.images * 255).round().astype(np.uint8)
    assert max_diff(sdrt_run(tiny_pipeline, list(seeds), **kw), want) <= PIXEL_TOL  # measured: 1
