"""A1111 1.10's samplers beyond samplers.py's: Restart (A1111's modules/sd_samplers_extra.py), DPM fast and DPM
adaptive (k-diffusion's sample_dpm_fast, sample_dpm_adaptive), with samplers.py's contract:
`denoise(x, sigma, intermediate=False)`, x at sigmas[0], `noise()` unit normal like x, `callback(i, x, denoised)`
after each step.
"""

import math

import numpy as np

from sdrt.errors import InvalidOption
from sdrt.runtime.sampler_kit import Denoise, Noise, ancestral_step
from sdrt.runtime.sampler_kit import no_callback as _noop
from sdrt.runtime.samplers_sde import sample_dpmpp_2m_sde
from sdrt.runtime.schedules import karras_sigmas

RESTART_SIGMA_MIN = 0.1  # Xu et al. 2023's restart interval [0.1, 2] for Stable Diffusion, as A1111 runs it
RESTART_SIGMA_MAX = 2.0
RESTART_MIN_STEPS = 20  # fewer steps: no restarts (plain Heun)


def karras_with_zero(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """(n + 1,) k-diffusion's get_sigmas_karras: n Karras sigmas (rho 7) then 0."""
    return np.append(karras_sigmas(sigma_min, sigma_max, n), 0.0)


def restart_steps(sigmas: np.ndarray) -> list[tuple[float, float]]:
    """The (sigma, sigma_next) pairs Restart walks: with 20 steps or more, a Karras schedule of the steps left after
    the restarts, and after the sigma nearest 0.1 one or two runs (36 steps or more: two) back from 2 down to it
    (Xu et al. 2023, Alg. 1; A1111's automatic restart_list). Fewer than 20 steps: SIGMAS as they are."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    steps = len(sigmas) - 1
    restarts = {}
    if steps >= RESTART_MIN_STEPS:
        count, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = karras_with_zero(steps - count * times, float(sigmas[-2]), float(sigmas[0]))
        restarts = {int(np.argmin(np.abs(sigmas - RESTART_SIGMA_MIN))): (count + 1, times, RESTART_SIGMA_MAX)}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((float(sigmas[i]), float(sigmas[i + 1])))
        if i + 1 in restarts:
            count, times, sigma_top = restarts[i + 1]
            top = int(np.argmin(np.abs(sigmas - sigma_top)))
            if top < i + 1:
                back = karras_with_zero(count, float(sigmas[i + 1]), float(sigmas[top]))[:-1]
                pairs.extend(list(zip(back[:-1].tolist(), back[1:].tolist(), strict=True)) * times)
    return pairs


def sample_restart(denoise: Denoise, x, sigmas, noise: Noise, s_noise=1.0, callback=_noop):
    """Restart sampling (Xu et al. 2023): Heun steps, and at each jump back up to a higher sigma, fresh noise
    raising x's noise level to it (A1111's restart_sampler; Euler on the final step to 0)."""
    last = None
    for i, (sigma, sigma_next) in enumerate(restart_steps(sigmas)):
        if last is not None and last < sigma:  # a restart: noise from `last` back up to `sigma`
            x = x + noise() * np.float32(s_noise * (sigma**2 - last**2) ** 0.5)
        denoised = denoise(x, sigma)
        d = (x - denoised) / np.float32(sigma)
        callback(i, x, denoised)
        dt = np.float32(sigma_next - sigma)
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoise(x_2, sigma_next)) / np.float32(sigma_next)
            x = x + (d + d_2) * np.float32(0.5) * dt
        last = sigma_next
    return x


def dpm_fast_orders(nfe: int) -> list[int]:
    """DPM-Solver-fast's step orders for NFE model evaluations (Lu et al. 2022, sec. 3.4): third order steps, then
    2 and 1 (NFE a multiple of 3) or one step of order NFE mod 3."""
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


def sample_dpm_fast(denoise: Denoise, x, sigmas, noise: Noise, eta=1.0, s_noise=1.0, callback=_noop):
    """DPM-Solver-fast (Lu et al. 2022, Alg. 1 orders 1-3 with r1 = 1/3, r2 = 2/3; k-diffusion dpm_solver_fast),
    len(sigmas) - 1 model evaluations in all, on steps even in t = -log(sigma) from sigmas[0] to the smallest
    positive sigma (the schedule's other sigmas are not used, as in A1111). ETA > 0: ancestral (A1111's default
    eta 1). Ends at that smallest sigma, as k-diffusion does."""
    sigma_max, sigma_min = float(sigmas[0]), float(np.min(sigmas[sigmas > 0]))
    nfe = len(sigmas) - 1
    orders = dpm_fast_orders(nfe)
    t_end = -math.log(sigma_min)
    ts = np.linspace(-math.log(sigma_max), t_end, len(orders) + 1)
    for i, order in enumerate(orders):
        t, t_next = float(ts[i]), float(ts[i + 1])
        sigma, sigma_next = math.exp(-t), math.exp(-t_next)
        su = 0.0
        if eta:
            sigma_down, _ = ancestral_step(sigma, sigma_next, eta)
            t_next = min(t_end, -math.log(sigma_down))
            su = max(sigma_next**2 - math.exp(-2 * t_next), 0.0) ** 0.5
        denoised = denoise(x, sigma, intermediate=True)
        eps = (x - denoised) / np.float32(sigma)
        callback(i, x, denoised)
        x = dpm_solver_step(denoise, x, eps, t, t_next, order)
        x = x + noise() * np.float32(su * s_noise)
    return x


def dpm_solver_step(denoise: Denoise, x, eps, t: float, t_next: float, order: int, r1=None, cache=None):
    """One DPM-Solver step of ORDER (1; 2 with r1 = 1/2 unless given; 3 with r1 = 1/3, r2 = 2/3) from t to t_next
    in the noise-prediction form x_next = x - sigma_next (e^h - 1) eps - ... (Lu et al. 2022, Alg. 1 and 2).
    CACHE (a dict) keeps the model's eps at t + r1 h for a second step from the same point (DPM adaptive)."""
    cache = {} if cache is None else cache

    def sigma_of(time):
        return math.exp(-time)

    def eps_at(x_s, time):
        s = sigma_of(time)
        return (x_s - denoise(x_s, s, intermediate=True)) / np.float32(s)

    h = t_next - t
    phi = math.expm1(h)
    if order == 1:
        return x - np.float32(sigma_of(t_next) * phi) * eps
    r1 = (0.5 if order == 2 else 1 / 3) if r1 is None else r1
    s1 = t + r1 * h
    if ("r1", r1) not in cache:
        u1 = x - np.float32(sigma_of(s1) * math.expm1(r1 * h)) * eps
        cache[("r1", r1)] = eps_at(u1, s1)
    eps_r1 = cache[("r1", r1)]
    if order == 2:
        return x - np.float32(sigma_of(t_next) * phi) * eps - np.float32(sigma_of(t_next) / (2 * r1) * phi) * (
            eps_r1 - eps
        )
    r2 = 2 / 3
    s2 = t + r2 * h
    u2 = (x - np.float32(sigma_of(s2) * math.expm1(r2 * h)) * eps
          - np.float32(sigma_of(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1)) * (eps_r1 - eps))  # fmt: skip
    eps_r2 = eps_at(u2, s2)
    return x - np.float32(sigma_of(t_next) * phi) * eps - np.float32(sigma_of(t_next) / r2 * (phi / h - 1)) * (
        eps_r2 - eps
    )


# k-diffusion's sample_dpm_adaptive defaults (A1111 passes none of them but eta)
ADAPTIVE = {"order": 3, "rtol": 0.05, "atol": 0.0078, "h_init": 0.05, "pcoeff": 0.0, "icoeff": 1.0, "dcoeff": 0.0,
            "accept_safety": 0.81}  # fmt: skip
ADAPTIVE_MAX_ATTEMPTS = 10_000  # steps tried, accepted or not, before giving up (a NaN error never accepts)


class StepSizeController:
    """A PID controller of the step size h on the inverse error (Söderlind 2003; k-diffusion's
    PIDStepSizeController), with the limiter 1 + atan(factor - 1)."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h, self.accept_safety, self.eps = h, accept_safety, eps
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.errs: list[float] = []

    def propose(self, error: float) -> bool:
        """Whether the step with ERROR is accepted; h is rescaled either way."""
        inverse = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inverse, inverse, inverse]
        self.errs[0] = inverse
        factor = 1 + math.atan(self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3 - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def sample_dpm_adaptive(denoise: Denoise, x, sigmas, noise: Noise, eta=1.0, s_noise=1.0, callback=_noop):
    """DPM-Solver-12/23 with adaptive step size (Lu et al. 2022, sec. 3.3 and Alg. 4-5; k-diffusion
    dpm_solver_adaptive, its defaults): from sigmas[0] to the smallest positive sigma in as many steps as the error
    control (rtol 0.05, atol 0.0078) takes, the step count ignored as in A1111. ETA > 0: ancestral (A1111's 1)."""
    o = ADAPTIVE
    sigma_max, sigma_min = float(sigmas[0]), float(np.min(sigmas[sigmas > 0]))
    s, t_end = -math.log(sigma_max), -math.log(sigma_min)
    x_prev = x
    pid = StepSizeController(o["h_init"], o["pcoeff"], o["icoeff"], o["dcoeff"], 1.5 if eta else o["order"],
                             o["accept_safety"])  # fmt: skip
    for attempt in range(ADAPTIVE_MAX_ATTEMPTS):
        if s >= t_end - 1e-5:
            return x
        t = min(t_end, s + pid.h)
        t_step, su = t, 0.0
        if eta:
            sigma_down, _ = ancestral_step(math.exp(-s), math.exp(-t), eta)
            t_step = min(t_end, -math.log(sigma_down))
            su = max(math.exp(-2 * t) - math.exp(-2 * t_step), 0.0) ** 0.5
        denoised = denoise(x, math.exp(-s), intermediate=True)
        eps = (x - denoised) / np.float32(math.exp(-s))
        cache: dict = {}
        x_low = dpm_solver_step(denoise, x, eps, s, t_step, 2, r1=1 / 3, cache=cache)
        x_high = dpm_solver_step(denoise, x, eps, s, t_step, 3, cache=cache)
        delta = np.maximum(np.float32(o["atol"]), np.float32(o["rtol"]) * np.maximum(np.abs(x_low), np.abs(x_prev)))
        error = float(np.linalg.norm(((x_low - x_high) / delta).ravel()) / x.size**0.5)
        if pid.propose(error):
            x_prev = x_low
            x = x_high + noise() * np.float32(su * s_noise)
            s = t
        callback(attempt, x, denoised)
    raise InvalidOption("sampler", "DPM adaptive", f"a sampler that converges here: its step size controller gave up "
                        f"after {ADAPTIVE_MAX_ATTEMPTS} steps")  # fmt: skip


def sample_dpmpp_2m_sde_heun(denoise: Denoise, x, sigmas, noise: Noise, eta=1.0, s_noise=1.0, callback=_noop):
    """A1111's DPM++ 2M SDE Heun: DPM-Solver++(2M) SDE with k-diffusion's solver_type "heun"."""
    return sample_dpmpp_2m_sde(denoise, x, sigmas, noise, eta, s_noise, solver_type="heun", callback=callback)
