"""TCD: Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024, section 4.4), as
diffusers' TCDScheduler runs it: the sampler Hyper-SD's 1-step (unified) LoRAs and TCD LoRAs are made for.

Written in sdrt's sigma units (x = x0 + sigma * eps, samplers.py). Each step goes from timestep t to the next one,
t' (0 after the last), through the intermediate timestep s = floor((1 - gamma) t'), gamma being diffusers' `eta`
(0: deterministic, DDIM-like; 1: the consistency estimate x0 followed by fresh noise):

    x_s  = D(x) + sigma_s * eps_hat,             eps_hat = (x - D(x)) / sigma_t
    x_t' = x_s + sqrt(sigma_t'^2 - sigma_s^2) z   (not on the last step: there x_s is the result)

sigma_s is the training schedule's sigma at the integer timestep s. The last step ends at t' = 0, whose sigma
(sqrt((1 - alpha_bar_0) / alpha_bar_0), not 0) the "tcd" timestep rule puts at the end of the schedule
(schedules.py), so the VAE gets diffusers' latent sqrt(alpha_bar_0) * x_s exactly.
"""

import math

import numpy as np

from sdrt.runtime.sampler_kit import Denoise, Noise
from sdrt.runtime.sampler_kit import no_callback as _noop

TCD_ETA = 0.3  # diffusers' TCDScheduler.step default (the paper's gamma)


def sample_tcd(denoise: Denoise, x, sigmas, noise: Noise, eta=TCD_ETA, timesteps=None, train_sigmas=None,
               callback=_noop):  # fmt: skip
    """TCD over SIGMAS; TIMESTEPS: the UNet timestep of each of sigmas[:-1]; TRAIN_SIGMAS: (num_train_timesteps,)
    the sigma of each integer training timestep (both from the model: sampling.py)."""
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i])
        eps = (x - denoised) / np.float32(sigma)
        end = i + 1 == steps and sigma_next <= float(train_sigmas[0]) * (1 + 1e-6)  # the end, at timestep 0
        if i + 1 < steps:
            t_next = float(timesteps[i + 1])
        elif not end:  # a first stage handing over above timestep 0 (SDXL's refiner): the handover's timestep
            t_next = float(np.interp(sigma_next, train_sigmas, np.arange(len(train_sigmas))))
        else:
            t_next = 0.0
        sigma_s = float(train_sigmas[int(math.floor((1 - eta) * t_next))])
        x = denoised + eps * np.float32(sigma_s)
        if eta > 0 and not end:
            x = x + noise() * np.float32(max(sigma_next**2 - sigma_s**2, 0.0) ** 0.5)
        callback(i, x, denoised)
    return x
