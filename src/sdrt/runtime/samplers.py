"""Samplers as small pure functions over an explicit sigma array (k-diffusion's formulation).

Every sampler takes `denoise(x, sigma) -> x0 estimate`, the starting x (noise scaled to sigmas[0]) and
the sigmas, and returns x at sigmas[-1]. x is float32 (B, C, H/8, W/8) in x0 + sigma * eps units.
`noise()` returns a fresh unit-normal array shaped like x (drawn per image, see rng.py);
`callback(i, x, denoised)` runs after step i. A multi-stage step evaluates its intermediate points with
`denoise(x, sigma, intermediate=True)`: the UNet then gets sigma_to_t(sigma), never a schedule timestep.
"""

import math

import numpy as np

from sdrt.errors import InvalidOption
from sdrt.runtime.sampler_kit import Denoise, Noise, ancestral_step, log_midpoint
from sdrt.runtime.sampler_kit import no_callback as _noop
from sdrt.runtime.samplers_extra import (  # noqa: F401 (the table's names)
    sample_dpm_adaptive,
    sample_dpm_fast,
    sample_dpmpp_2m_sde_heun,
    sample_restart,
)
from sdrt.runtime.samplers_multistep import (  # noqa: F401 (the table's and the tests' names)
    ADAMS_BASHFORTH,
    LMS_ORDER,
    UNIPC_ORDER,
    UNIPC_VARIANTS,
    lms_coefficients,
    sample_lms,
    sample_plms,
    sample_unipc,
    unipc_step,
)
from sdrt.runtime.samplers_sde import (  # noqa: F401 (the table's and the tests' names)
    brownian_noise,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
)
from sdrt.runtime.samplers_tcd import sample_tcd  # noqa: F401 (the table's name)

CHURN_GAMMA_MAX = 2**0.5 - 1  # Karras 2022, Alg. 2: gamma_i <= sqrt(2) - 1 (never more than double the variance)


def churn(x, sigma, steps: int, noise: Noise | None, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float):
    """(x, sigma_hat): Karras 2022, Alg. 2 lines 4-6, raise the noise level to sigma_hat = (1 + gamma) sigma."""
    if not s_churn:
        return x, sigma
    eps = noise() * np.float32(s_noise)  # drawn on every step, as k-diffusion does, so the draws stay in step
    gamma = min(s_churn / steps, CHURN_GAMMA_MAX) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = float(sigma) * (1 + gamma)
    return x + eps * np.float32((sigma_hat**2 - float(sigma) ** 2) ** 0.5), sigma_hat


def sample_euler(
    denoise: Denoise,
    x,
    sigmas,
    noise: Noise | None = None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=math.inf,
    s_noise=1.0,
    callback=_noop,
):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras 2022, Alg. 2)."""
    for i in range(len(sigmas) - 1):
        sigma_next = sigmas[i + 1]
        x, sigma = churn(x, sigmas[i], len(sigmas) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
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


LCM_SIGMA_DATA = 0.5  # sigma_data of the consistency boundary condition (Song et al. 2023), as LCM uses it
LCM_TIMESTEP_SCALING = 10.0  # diffusers' LCMScheduler default


def sample_lcm(
    denoise: Denoise, x, sigmas, noise: Noise, timesteps=None, timestep_scaling=LCM_TIMESTEP_SCALING, callback=_noop
):
    """LCM multistep sampling (Luo et al. 2023, Alg. 3): a consistency estimate of x0, then fresh noise to sigma_next.

    With TIMESTEPS (the UNet timestep of each sigma) the estimate is c_skip(t) x + c_out(t) D(x), the boundary
    condition of Song et al. 2023 at t * timestep_scaling, as diffusers' LCMScheduler; without, D(x) (k-diffusion).
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i])
        if timesteps is not None:
            scaled = float(timesteps[i]) * timestep_scaling
            c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
            c_out = scaled / (scaled**2 + LCM_SIGMA_DATA**2) ** 0.5
            # c_skip applies to the variance-preserving x: x / sqrt(1 + sigma^2)
            denoised = np.float32(c_out) * denoised + np.float32(c_skip / (1 + sigma**2) ** 0.5) * x
        x = denoised
        if sigma_next > 0:
            x = x + noise() * np.float32(sigma_next)
        callback(i, x, denoised)
    return x


def sample_heun(
    denoise: Denoise,
    x,
    sigmas,
    noise: Noise | None = None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=math.inf,
    s_noise=1.0,
    callback=_noop,
):
    """Heun's second-order method on the probability-flow ODE (Karras 2022, Alg. 2); Euler on the final step."""
    for i in range(len(sigmas) - 1):
        sigma_next = sigmas[i + 1]
        x, sigma = churn(x, sigmas[i], len(sigmas) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma)
        derivative = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + derivative * dt
        else:  # trapezoid: average the slopes at both ends of the Euler step
            x_2 = x + derivative * dt
            derivative_2 = (x_2 - denoise(x_2, sigma_next)) / sigma_next
            x = x + (derivative + derivative_2) / 2 * dt
        callback(i, x, denoised)
    return x


def sample_dpm_2(
    denoise: Denoise,
    x,
    sigmas,
    noise: Noise | None = None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=math.inf,
    s_noise=1.0,
    callback=_noop,
):
    """DPM-Solver-2 (Lu et al. 2022, Alg. 1, r = 1/2; k-diffusion sample_dpm_2): the slope at the log-sigma midpoint."""
    for i in range(len(sigmas) - 1):
        sigma_next = float(sigmas[i + 1])
        x, sigma = churn(x, sigmas[i], len(sigmas) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
        sigma = float(sigma)
        denoised = denoise(x, sigma)
        derivative = (x - denoised) / np.float32(sigma)
        if sigma_next == 0:
            x = x + derivative * np.float32(sigma_next - sigma)
        else:
            sigma_mid = log_midpoint(sigma, sigma_next)
            x_2 = x + derivative * np.float32(sigma_mid - sigma)
            derivative_2 = (x_2 - denoise(x_2, sigma_mid, intermediate=True)) / np.float32(sigma_mid)
            x = x + derivative_2 * np.float32(sigma_next - sigma)
        callback(i, x, denoised)
    return x


def sample_dpm_2_ancestral(denoise: Denoise, x, sigmas, noise: Noise, eta=1.0, s_noise=1.0, callback=_noop):
    """DPM-Solver-2 step to sigma_down, then fresh noise up to sigma_next (k-diffusion sample_dpm_2_ancestral)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        derivative = (x - denoised) / np.float32(sigma)
        if sigma_down == 0:
            x = x + derivative * np.float32(sigma_down - sigma)
        else:
            sigma_mid = log_midpoint(sigma, sigma_down)
            x_2 = x + derivative * np.float32(sigma_mid - sigma)
            derivative_2 = (x_2 - denoise(x_2, sigma_mid, intermediate=True)) / np.float32(sigma_mid)
            x = x + derivative_2 * np.float32(sigma_down - sigma)
            x = x + noise() * np.float32(sigma_up * s_noise)
        callback(i, x, denoised)
    return x


# A1111 sampler name -> (function name here, diffusers timestep rule in schedules.py).
SAMPLERS = {
    "Euler": ("sample_euler", "euler"),
    "Euler a": ("sample_euler_ancestral", "euler"),
    "DDIM": ("sample_ddim", "ddim"),
    "PLMS": ("sample_plms", "pndm"),
    "UniPC": ("sample_unipc", "dpmsolver"),
    "LCM": ("sample_lcm", "lcm"),
    "TCD": ("sample_tcd", "tcd"),  # samplers_tcd.py
    "DPM++ 2M": ("sample_dpmpp_2m", "dpmsolver"),
    "Heun": ("sample_heun", "euler"),
    "DPM2": ("sample_dpm_2", "kdpm2"),
    "DPM2 a": ("sample_dpm_2_ancestral", "kdpm2"),
    "LMS": ("sample_lms", "euler"),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", "euler"),
    "DPM++ SDE": ("sample_dpmpp_sde", "euler"),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", "dpmsolver"),
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", "dpmsolver"),
    "Restart": ("sample_restart", "euler"),  # samplers_extra.py
    "DPM fast": ("sample_dpm_fast", "euler"),
    "DPM adaptive": ("sample_dpm_adaptive", "euler"),
    "DPM++ 2M SDE Heun": ("sample_dpmpp_2m_sde_heun", "dpmsolver"),
}
# Each sampler's keyword arguments beyond (denoise, x, sigmas, noise, callback): its whole contract (k-diffusion's
# meanings). The user's knobs (eta, s_noise, s_churn, s_tmin, s_tmax) reach only the samplers that take them, as in
# A1111 where Euler ignores eta; clip_denoised (DDIM), timesteps/timestep_scaling (LCM) and train_sigmas (TCD) come
# from the model.
_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
_ANCESTRAL = ("eta", "s_noise")
SAMPLER_ARGUMENTS = {
    "sample_euler": _CHURN,
    "sample_euler_ancestral": _ANCESTRAL,
    "sample_ddim": ("eta", "clip_denoised"),
    "sample_plms": (),
    "sample_unipc": ("order", "variant"),
    "sample_lcm": ("timesteps", "timestep_scaling"),
    "sample_tcd": ("eta", "timesteps", "train_sigmas"),
    "sample_dpmpp_2m": (),
    "sample_heun": _CHURN,
    "sample_dpm_2": _CHURN,
    "sample_dpm_2_ancestral": _ANCESTRAL,
    "sample_lms": ("order",),
    "sample_dpmpp_2s_ancestral": _ANCESTRAL,
    "sample_dpmpp_sde": ("eta", "s_noise", "r"),
    "sample_dpmpp_2m_sde": (*_ANCESTRAL, "solver_type"),  # solver_type: set by DPM++ 2M SDE Heun only
    "sample_dpmpp_3m_sde": _ANCESTRAL,
    "sample_restart": ("s_noise",),
    "sample_dpm_fast": _ANCESTRAL,
    "sample_dpm_adaptive": _ANCESTRAL,
    "sample_dpmpp_2m_sde_heun": _ANCESTRAL,
}


def sampler_function(name: str):
    """(function, the keyword arguments it takes) of an A1111 sampler name (resolved)."""
    function = SAMPLERS[name][0]
    return globals()[function], SAMPLER_ARGUMENTS[function]  # this module's, or from samplers_multistep/_sde/_extra


# A1111's aliases (sd_samplers_kdiffusion.py) and its pre-1.9 names that carried the schedule.
SAMPLER_ALIASES = {
    "k_euler": "Euler",
    "k_euler_a": "Euler a",
    "k_euler_ancestral": "Euler a",
    "k_dpmpp_2m": "DPM++ 2M",
    "k_heun": "Heun",
    "k_dpm_2": "DPM2",
    "k_dpm_2_a": "DPM2 a",
    "k_lms": "LMS",
    "k_dpmpp_2s_a": "DPM++ 2S a",
    "k_dpmpp_sde": "DPM++ SDE",
    "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "k_dpmpp_3m_sde": "DPM++ 3M SDE",
    "ddim": "DDIM",
    "k_lcm": "LCM",
    "k_tcd": "TCD",
    "restart": "Restart",
    "k_dpm_fast": "DPM fast",
    "k_dpm_ad": "DPM adaptive",
    "k_dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
}
LEGACY_SCHEDULE_SUFFIXES = ("karras", "exponential")  # A1111 < 1.9 names such as "DPM++ 2M SDE Exponential"


def resolve_sampler(name: str, scheduler: str) -> tuple[str, str]:
    """(A1111 sampler name, scheduler) from a name such as "Euler a", "k_euler" or "DPM++ 2M Karras"."""
    if not isinstance(name, str):
        raise InvalidOption("sampler", name, ", ".join(SAMPLERS))
    from sdrt.runtime.schedules import resolve_scheduler

    scheduler = resolve_scheduler(scheduler)
    by_lower = {k.lower(): k for k in SAMPLERS} | SAMPLER_ALIASES
    key = name.strip().lower()
    for suffix in LEGACY_SCHEDULE_SUFFIXES:
        base = key.removesuffix(" " + suffix)
        if base != key and base in by_lower:
            if scheduler not in ("automatic", suffix):
                raise InvalidOption("scheduler", scheduler, f"automatic or {suffix} with the sampler {name!r}")
            return by_lower[base], suffix
    if key not in by_lower:
        raise InvalidOption("sampler", name, ", ".join(SAMPLERS) + " (and legacy names such as 'DPM++ 2M Karras')")
    return by_lower[key], scheduler
