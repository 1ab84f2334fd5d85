"""A1111 1.10's samplers beyond samplers.py's: Restart (A1111's modules/sd_samplers_extra.py) and DPM fast
(k-diffusion's sample_dpm_fast), with samplers.py's contract: `denoise(x, sigma, intermediate=False)`, x at
sigmas[0], `noise()` unit normal like x, `callback(i, x, denoised)` after each step.
"""

import math

import numpy as np

from sdrt.runtime.samplers import Denoise, Noise, _noop, ancestral_step
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


def dpm_solver_step(denoise: Denoise, x, eps, t: float, t_next: float, order: int):
    """One DPM-Solver step of ORDER (1, 2 with r1 = 1/2, 3 with r1 = 1/3, r2 = 2/3) from t to t_next in the
    noise-prediction form x_next = x - sigma_next (e^h - 1) eps - ... (Lu et al. 2022, Alg. 1 and 2)."""

    def sigma_of(time):
        return math.exp(-time)

    def eps_at(x_s, time):
        s = sigma_of(time)
        return (x_s - denoise(x_s, s, intermediate=True)) / np.float32(s)

    h = t_next - t
    phi = math.expm1(h)
    if order == 1:
        return x - np.float32(sigma_of(t_next) * phi) * eps
    if order == 2:
        r1 = 0.5
        s1 = t + r1 * h
        u1 = x - np.float32(sigma_of(s1) * math.expm1(r1 * h)) * eps
        eps_r1 = eps_at(u1, s1)
        return x - np.float32(sigma_of(t_next) * phi) * eps - np.float32(sigma_of(t_next) / (2 * r1) * phi) * (
            eps_r1 - eps
        )
    r1, r2 = 1 / 3, 2 / 3
    s1, s2 = t + r1 * h, t + r2 * h
    u1 = x - np.float32(sigma_of(s1) * math.expm1(r1 * h)) * eps
    eps_r1 = eps_at(u1, s1)
    u2 = (x - np.float32(sigma_of(s2) * math.expm1(r2 * h)) * eps
          - np.float32(sigma_of(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1)) * (eps_r1 - eps))  # fmt: skip
    eps_r2 = eps_at(u2, s2)
    return x - np.float32(sigma_of(t_next) * phi) * eps - np.float32(sigma_of(t_next) / r2 * (phi / h - 1)) * (
        eps_r2 - eps
    )
