"""Samplers as small pure functions over an explicit sigma array (k-diffusion's formulation).

Every sampler takes `denoise(x, sigma) -> x0 estimate`, the starting x (noise scaled to sigmas[0]) and
the sigmas, and returns x at sigmas[-1]. x is float32 (B, C, H/8, W/8) in x0 + sigma * eps units.
`noise()` returns a fresh unit-normal array shaped like x (drawn per image, see rng.py);
`callback(i, x, denoised)` runs after step i.
"""

from collections.abc import Callable

import numpy as np

Denoise = Callable[[np.ndarray, float], np.ndarray]
Noise = Callable[[], np.ndarray]


def _noop(i, x, denoised):
    return None


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step: deterministic move to sigma_down, then add sigma_up noise."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def sample_euler(denoise: Denoise, x, sigmas, noise: Noise | None = None, callback=_noop):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras 2022, Alg. 2)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        derivative = (x - denoised) / sigma
        x = x + derivative * (sigma_next - sigma)
        callback(i, x, denoised)
    return x


def sample_euler_ancestral(denoise: Denoise, x, sigmas, noise: Noise, eta=1.0, s_noise=1.0, callback=_noop):
    """Euler step to sigma_down, then fresh noise up to sigma_next (k-diffusion sample_euler_ancestral)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = ancestral_step(float(sigma), float(sigma_next), eta)
        x = x + (x - denoised) / sigma * np.float32(sigma_down - sigma)
        # diffusers draws noise on every step, the last (sigma_up = 0) too: keep the generator in step.
        x = x + noise() * np.float32(sigma_up * s_noise)
        callback(i, x, denoised)
    return x


def sample_ddim(denoise: Denoise, x, sigmas, noise: Noise | None = None, eta=0.0, clip_denoised=None, callback=_noop):
    """DDIM (Song et al. 2021, eq. 12) written in sigma units; eta=0 is the same step as Euler."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i])
        eps = (x - denoised) / np.float32(sigma)
        if clip_denoised is not None:
            denoised = np.clip(denoised, -clip_denoised, clip_denoised)
        alpha, alpha_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)  # alpha_bar at both ends
        variance = (1 - alpha_next) / (1 - alpha) * (1 - alpha / alpha_next)
        std = eta * variance**0.5
        # x_next (variance preserving) = sqrt(a') x0 + sqrt(1 - a' - std^2) eps + std z; divide by sqrt(a').
        x = denoised + eps * np.float32((1 - alpha_next - std**2) ** 0.5 / alpha_next**0.5)
        if eta > 0:
            x = x + noise() * np.float32(std / alpha_next**0.5)
        callback(i, x, denoised)
    return x


def sample_dpmpp_2m(denoise: Denoise, x, sigmas, noise: Noise | None = None, callback=_noop):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), first order on the first and the final (sigma=0) step."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i])
        t, t_next = -np.log(sigma), (-np.log(sigma_next) if sigma_next > 0 else np.inf)
        h = t_next - t
        if old_denoised is None or sigma_next == 0:
            x = np.float32(sigma_next / sigma) * x - np.float32(np.expm1(-h)) * denoised
        else:
            r = h_last / h
            corrected = np.float32(1 + 1 / (2 * r)) * denoised - np.float32(1 / (2 * r)) * old_denoised
            x = np.float32(sigma_next / sigma) * x - np.float32(np.expm1(-h)) * corrected
        old_denoised, h_last = denoised, h
        callback(i, x, denoised)
    return x
