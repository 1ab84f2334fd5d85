"""Noise schedules: training sigmas, diffusers' timestep spacings, and the Karras schedule, in numpy.

A schedule is an explicit array of sigmas (variance-exploding parameterisation, x = x0 + sigma * eps)
together with the UNet timestep of each sigma. Which diffusers scheduler class a sampler reproduces
decides the spacing rule and the scale of the initial noise, so those are chosen per "timestep rule".
"""

from dataclasses import dataclass, replace

import numpy as np

from sdrt.runtime.manifest import SchedulerConfig

KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5
SPACINGS = ("leading", "linspace", "trailing")
TIMESTEP_RULES = ("euler", "ddim", "dpmsolver")  # diffusers' Euler*, DDIM and DPMSolver* schedulers
# What each diffusers class uses for a key the model's config does not set.
RULE_DEFAULTS = {
    "euler": {"timestep_spacing": "linspace", "set_alpha_to_one": False, "clip_sample": False},
    "ddim": {"timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": True},
    "dpmsolver": {"timestep_spacing": "linspace", "set_alpha_to_one": False, "clip_sample": False},
}


@dataclass(frozen=True)
class Schedule:
    sigmas: np.ndarray  # (steps + 1,) float32, decreasing; the last is where sampling ends (0 or sigma_min)
    timesteps: np.ndarray  # (steps,) float32: the UNet timestep for each of sigmas[:-1]
    initial_noise_scale: float  # unit-normal noise times this is the starting x (diffusers' init_noise_sigma)

    @property
    def final_scale(self) -> float:
        """Factor from the final x (x0 + sigma * eps) to the variance-preserving latent the VAE decodes."""
        return float(1.0 / np.sqrt(1.0 + float(self.sigmas[-1]) ** 2))


def resolve_config(cfg: SchedulerConfig, rule: str) -> SchedulerConfig:
    """CFG with every key it leaves unset (None) given the default of RULE's diffusers class."""
    return replace(cfg, **{k: v for k, v in RULE_DEFAULTS[rule].items() if getattr(cfg, k) is None})


def train_betas(cfg: SchedulerConfig) -> np.ndarray:
    """(N,) float32 betas of the training noise schedule (DDPM, Ho et al. 2020; SD's scaled_linear)."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        return np.asarray(cfg.trained_betas, dtype=np.float32)
    if cfg.beta_schedule == "linear":
        return np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float64).astype(np.float32)
    if cfg.beta_schedule == "scaled_linear":
        return (np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=np.float64) ** 2).astype(np.float32)
    if cfg.beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17

        def alpha_bar(t):
            return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2

        t = np.arange(n, dtype=np.float64)
        return np.minimum(1 - alpha_bar((t + 1) / n) / alpha_bar(t / n), 0.999).astype(np.float32)
    raise ValueError(f"unsupported beta_schedule {cfg.beta_schedule!r}")


def train_alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """(N,) float32 cumulative product of (1 - beta), with zero terminal SNR if the config asks for it."""
    betas = train_betas(cfg)
    if cfg.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    acp = np.cumprod(1.0 - betas, dtype=np.float32)
    if cfg.rescale_betas_zero_snr:
        acp[-1] = 2.0**-24  # diffusers' stand-in for 0 so sigma stays finite
    return acp


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift/scale sqrt(alpha_bar) so the last timestep has zero SNR."""
    sqrt_acp = np.sqrt(np.cumprod(1.0 - betas.astype(np.float64)))
    first, last = sqrt_acp[0], sqrt_acp[-1]
    sqrt_acp = (sqrt_acp - last) * first / (first - last)
    acp = sqrt_acp**2
    alphas = np.concatenate([acp[:1], acp[1:] / acp[:-1]])
    return (1.0 - alphas).astype(np.float32)


def train_sigmas(cfg: SchedulerConfig) -> np.ndarray:
    """(N,) float32 sigma of each training timestep: sqrt((1 - alpha_bar) / alpha_bar)."""
    acp = train_alphas_cumprod(cfg)
    return np.sqrt((1.0 - acp) / acp).astype(np.float32)


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of SIGMA by linear interpolation in log-sigma (k-diffusion, diffusers)."""
    sigma = np.atleast_1d(np.asarray(sigma, dtype=np.float64))
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras et al. 2022, eq. 5: n sigmas from sigma_max to sigma_min, evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def spaced_timesteps(cfg: SchedulerConfig, steps: int, rule: str) -> np.ndarray:
    """(steps,) decreasing timesteps by cfg.timestep_spacing, exactly as the diffusers class for RULE does."""
    n, spacing = cfg.num_train_timesteps, cfg.timestep_spacing
    if spacing not in SPACINGS:
        raise ValueError(f"unsupported timestep_spacing {spacing!r}")
    if rule == "dpmsolver":  # DPMSolverMultistepScheduler spaces steps + 1 points and drops the last
        if spacing == "linspace":
            return np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.float64)
        if spacing == "leading":
            ratio = n // (steps + 1)
            return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.float64) + cfg.steps_offset
    if spacing == "linspace":
        t = np.linspace(0, n - 1, steps)[::-1]
        return t.round() if rule in ("ddim", "dpmsolver") else t.astype(np.float32).astype(np.float64)
    if spacing == "leading":
        ratio = n // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float64) + cfg.steps_offset
    ratio = n / steps  # trailing
    return np.arange(n, 0, -ratio).round().astype(np.float64) - 1


def build_schedule(cfg: SchedulerConfig, steps: int, rule: str, scheduler: str) -> Schedule:
    """Sigmas and timesteps for STEPS steps under diffusers' RULE, with scheduler "automatic" or "karras"."""
    cfg = resolve_config(cfg, rule)
    sigmas_train = train_sigmas(cfg).astype(np.float64)
    log_sigmas = np.log(sigmas_train)
    timesteps = spaced_timesteps(cfg, steps, rule)
    sigmas = np.interp(timesteps, np.arange(len(sigmas_train)), sigmas_train)
    if scheduler == "karras":
        if rule == "dpmsolver":  # DPMSolver: the whole training range, UNet timesteps rounded
            sigmas = karras_sigmas(sigmas_train[0], sigmas_train[-1], steps)
            timesteps = sigma_to_t(sigmas, log_sigmas).round()
        else:  # Euler: the range of the spaced sigmas, fractional timesteps
            sigmas = karras_sigmas(sigmas[-1], sigmas[0], steps)
            timesteps = sigma_to_t(sigmas, log_sigmas)
    elif scheduler != "automatic":
        raise ValueError(f"unsupported scheduler {scheduler!r}")
    if rule == "ddim" and scheduler == "automatic":  # DDIM ends at alpha_bar[0] (or 1 with set_alpha_to_one)
        acp0 = 1.0 if cfg.set_alpha_to_one else 1.0 / (1.0 + sigmas_train[0] ** 2)
        final = np.sqrt((1.0 - acp0) / acp0)
    else:
        final = 0.0
    sigmas = np.append(sigmas, final).astype(np.float32)
    sigma_max = float(sigmas[0])
    if rule == "euler" and cfg.timestep_spacing in ("linspace", "trailing"):
        initial = sigma_max
    else:  # variance-preserving samplers start from unit noise: sqrt(1 + sigma^2) in x0 + sigma * eps units
        initial = float(np.sqrt(sigma_max**2 + 1.0))
    return Schedule(sigmas, timesteps.astype(np.float32), initial)
