"""What every sampler shares: the denoiser and noise callables' types, the ancestral split of a step, the
log-midpoint of second-order steps (samplers.py, samplers_sde.py)."""

from collections.abc import Callable

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
