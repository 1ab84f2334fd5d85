"""The schedule types A1111 1.10 adds to k-diffusion's (modules/sd_schedulers.py): Polyexponential, KL Optimal, Align
Your Steps, Normal and DDIM. As in A1111 they span the model's whole training range (sigma_min = the first
training sigma, sigma_max = the last), whatever the model's timestep spacing.

Each returns (timesteps, sigmas, final): STEPS decreasing sigmas (DDIM's grid may have one more, as in A1111), their
fractional UNet timesteps, and the sigma the last step ends at (0, except KL Optimal's, which ends at sigma_min).
"""

import math

import numpy as np

from sdrt.runtime.sigma_time import sigma_to_t, t_to_sigma

A1111_SCHEDULES = ("polyexponential", "kl_optimal", "align_your_steps", "normal", "ddim")
POLYEXPONENTIAL_RHO = 1.0  # A1111's default_rho for it (k-diffusion's get_sigmas_polyexponential default too)
# Sabour et al. 2024, "Align Your Steps": the optimised 10-step sigmas NVIDIA published for SD 1.5 and SDXL
# (the families pick theirs: Family.align_your_steps)
AYS_SIGMAS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SIGMAS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


def polyexponential_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = POLYEXPONENTIAL_RHO):
    """(n,) log sigma following a polynomial of degree RHO in the step: exp(r^rho (ln max - ln min) + ln min),
    r from 1 to 0 (k-diffusion's get_sigmas_polyexponential)."""
    ramp = np.linspace(1.0, 0.0, n) ** rho
    return np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))


def kl_optimal_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """(n + 1,) sigmas evenly spaced in arctan(sigma), from sigma_max down to sigma_min (Sabour et al. 2024's
    KL-optimal schedule: tan((1 - i/n) atan(sigma_max) + (i/n) atan(sigma_min)))."""
    fraction = np.arange(n + 1) / n
    return np.tan(fraction * math.atan(sigma_min) + (1.0 - fraction) * math.atan(sigma_max))


def loglinear_interp(table, n: int) -> np.ndarray:
    """(n,) decreasing values: TABLE resampled to N points, linearly in log value over a 0..1 axis."""
    table = np.asarray(table, dtype=np.float64)
    log_increasing = np.log(table[::-1])
    resampled = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(table)), log_increasing)
    return np.exp(resampled)[::-1]


def align_your_steps_sigmas(table, n: int) -> np.ndarray:
    """(n,) a published table (the family's: SD 1.5's unless it has its own), log-linearly resampled to n."""
    table = AYS_SIGMAS_SD15 if table is None else table
    return np.array(table, dtype=np.float64) if n == len(table) else loglinear_interp(table, n)


def ddim_grid(n_train: int, steps: int) -> np.ndarray:
    """Decreasing training timesteps 1, 1 + k, 1 + 2k, ... (k = n_train // steps): A1111's DDIM schedule type
    (len: ceil((n_train - 1) / k), which is steps + 1 when steps does not divide n_train evenly enough)."""
    stride = max(n_train // steps, 1)
    return np.arange(1, n_train, stride, dtype=np.float64)[::-1]


def a1111_schedule(scheduler: str, steps: int, sigmas_train: np.ndarray, log_sigmas: np.ndarray, ays_table=None):
    """(timesteps, sigmas, final) of SCHEDULER (A1111_SCHEDULES) for a model of training sigmas SIGMAS_TRAIN;
    AYS_TABLE: the family's Align Your Steps sigmas."""
    sigma_min, sigma_max = float(sigmas_train[0]), float(sigmas_train[-1])
    final = 0.0
    if scheduler == "normal":  # even in timestep from t(sigma_max) to t(sigma_min)
        start, end = sigma_to_t([sigma_max, sigma_min], log_sigmas)
        timesteps = np.linspace(start, end, steps)
        return timesteps, t_to_sigma(timesteps, log_sigmas), final
    if scheduler == "ddim":
        timesteps = ddim_grid(len(sigmas_train), steps)
        return timesteps, sigmas_train[timesteps.astype(np.int64)], final
    if scheduler == "polyexponential":
        sigmas = polyexponential_sigmas(sigma_min, sigma_max, steps)
    elif scheduler == "kl_optimal":
        sigmas, final = kl_optimal_sigmas(sigma_min, sigma_max, steps)[:-1], sigma_min
    elif scheduler == "align_your_steps":
        sigmas = align_your_steps_sigmas(ays_table, steps)
    else:
        raise ValueError(f"unsupported A1111 schedule {scheduler!r}")
    return sigma_to_t(sigmas, log_sigmas), sigmas, final
