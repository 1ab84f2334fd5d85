"""What every sampler shares: the denoiser and noise callables' types, the ancestral split of a step, the
log-midpoint of second-order steps, the noise paths of the DPM-Solver++ SDE steps (samplers.py, samplers_sde.py)."""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Denoise = Callable[..., np.ndarray]  # (x, sigma, intermediate=False) -> x0 estimate
Noise = Callable[[], np.ndarray]


def no_callback(i, x, denoised):
    return None


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step: deterministic move to sigma_down, then add sigma_up noise."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def log_midpoint(sigma_from: float, sigma_to: float) -> float:
    """The sigma halfway between two sigmas in log sigma (their geometric mean): DPM-Solver-2's intermediate point."""
    return float(sigma_from * sigma_to) ** 0.5


@dataclass(frozen=True)
class NoisePath:
    """How x mixes data and noise: x = alpha(sigma) x0 + sigma noise, and the step h = lambda(sigma_next) -
    lambda(sigma) in the half log-SNR lambda = log(alpha / sigma) (what a DPM-Solver++ step needs of it)."""

    alpha: Callable[[float], float]
    log_snr_step: Callable[[float, float], float]  # (sigma, sigma_next) -> h


# k-diffusion's variance-exploding path x = x0 + sigma noise: alpha = 1, lambda = -log sigma.
VARIANCE_EXPLODING = NoisePath(
    alpha=lambda sigma: 1.0, log_snr_step=lambda sigma, sigma_next: math.log(sigma / sigma_next)
)
