"""Sigmas <-> the denoiser's fractional timesteps over a training schedule's log-sigmas, by linear interpolation in
log-sigma (k-diffusion's sigma_to_t / t_to_sigma): what every schedule type is built from (schedules.py,
a1111_schedules.py)."""

import numpy as np


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of SIGMA by linear interpolation in log-sigma (k-diffusion, diffusers)."""
    sigma = np.atleast_1d(np.asarray(sigma, dtype=np.float64))
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def t_to_sigma(t, log_sigmas: np.ndarray) -> np.ndarray:
    """Sigma at fractional timestep T by linear interpolation in log-sigma (k-diffusion's t_to_sigma)."""
    t = np.asarray(t, dtype=np.float64)
    low = np.floor(t).astype(np.int64)
    high = np.minimum(low + 1, len(log_sigmas) - 1)
    w = t - low
    return np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])
