"""Samplers whose noise step is written for the flow forward process x = (1 - sigma) x0 + sigma noise (the
k-diffusion ones add noise as x0 + sigma noise): Euler a's own step, and DPM++ 2M SDE as samplers_sde.py's one
implementation (dpmpp_2m_sde) on FLOW_PATH. The deterministic samplers need no variant (flow.py)."""

import math
from functools import partial

import numpy as np

from sdrt.runtime.sampler_kit import Denoise, Noise, NoisePath, no_callback
from sdrt.runtime.samplers_sde import dpmpp_2m_sde


def rf_ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, renoise) of an ancestral step from SIGMA to SIGMA_NEXT on the flow path.

    The step goes deterministically to sigma_down = sigma_next (1 + (sigma_next / sigma - 1) eta), rescales the
    x0 part from 1 - sigma_down to 1 - sigma_next, and adds fresh noise so the noise part's variance is
    sigma_next^2 again: renoise^2 = sigma_next^2 - (sigma_down (1 - sigma_next) / (1 - sigma_down))^2.
    """
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    scaled = sigma_down * (1 - sigma_next) / (1 - sigma_down)
    return sigma_down, max(sigma_next**2 - scaled**2, 0.0) ** 0.5


def sample_euler_ancestral_rf(denoise: Denoise, x, sigmas, noise: Noise, eta=1.0, s_noise=1.0, callback=no_callback):
    """Euler to sigma_down, then back onto the flow path at sigma_next with fresh noise (rf_ancestral_step)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i])
        sigma_down, renoise = rf_ancestral_step(sigma, sigma_next, eta)
        x = x + (x - denoised) / np.float32(sigma) * np.float32(sigma_down - sigma)
        x = x * np.float32((1 - sigma_next) / (1 - sigma_down)) + noise() * np.float32(renoise * s_noise)
        callback(i, x, denoised)
    return x


def _half_log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma on the flow path (-inf at sigma = 1)."""
    return -math.inf if sigma >= 1 else math.log((1 - sigma) / sigma)


# DPM-Solver++(2M) SDE's general form with alpha = 1 - sigma, as ComfyUI writes it for flow models: from sigma = 1
# (alpha 0, lambda -inf) its step is x = (1 - sigma_next) D + sigma_next noise.
FLOW_PATH = NoisePath(
    alpha=lambda sigma: 1 - sigma,
    log_snr_step=lambda sigma, sigma_next: _half_log_snr(sigma_next) - _half_log_snr(sigma),
)


# A1111 sampler name -> (function, the keyword arguments it takes), where the flow families need their own.
FLOW_VARIANTS = {
    "Euler a": (sample_euler_ancestral_rf, ("eta", "s_noise")),
    "DPM++ 2M SDE": (partial(dpmpp_2m_sde, FLOW_PATH), ("eta", "s_noise")),
    "DPM++ 2M SDE Heun": (partial(dpmpp_2m_sde, FLOW_PATH, solver_type="heun"), ("eta", "s_noise")),
}
