"""The stochastic samplers of the DPM-Solver++ family (Lu et al. 2022): 2S ancestral, SDE, 2M SDE and 3M SDE, with
Brownian-path noise as k-diffusion's BrownianTreeNoiseSampler gives it (samplers.py holds the table)."""

import math

import numpy as np

from sdrt.runtime.sampler_kit import VARIANCE_EXPLODING, Denoise, Noise, NoisePath, ancestral_step, log_midpoint
from sdrt.runtime.sampler_kit import no_callback as _noop


def brownian_noise(z_first, z_rest, sigma: float, sigma_mid: float, sigma_next: float):
    """Unit noise of a Brownian increment over (sigma, sigma_next) continuing z_first's over (sigma, sigma_mid).

    z_first and z_rest are unit normals, z_rest fresh for (sigma_mid, sigma_next): both increments then come from one
    path, as with k-diffusion's BrownianTreeNoiseSampler (Brownian motion in sigma).
    """
    first, rest = sigma - sigma_mid, sigma_mid - sigma_next
    return (z_first * np.float32(first**0.5) + z_rest * np.float32(rest**0.5)) * np.float32((first + rest) ** -0.5)


def sample_dpmpp_2s_ancestral(denoise: Denoise, x, sigmas, noise: Noise, eta=1.0, s_noise=1.0, callback=_noop):
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1, r = 1/2) to sigma_down, then noise (k-diffusion's 2S ancestral)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + (x - denoised) / np.float32(sigma) * np.float32(sigma_down - sigma)
        else:  # lambda = -log sigma; h = lambda(sigma_down) - lambda(sigma); midpoint at lambda + h / 2
            h = math.log(sigma / sigma_down)
            sigma_mid = log_midpoint(sigma, sigma_down)
            x_2 = np.float32(sigma_mid / sigma) * x - np.float32(math.expm1(-h / 2)) * denoised
            denoised_2 = denoise(x_2, sigma_mid, intermediate=True)
            x = np.float32(sigma_down / sigma) * x - np.float32(math.expm1(-h)) * denoised_2
        if sigma_next > 0:
            x = x + noise() * np.float32(sigma_up * s_noise)
        callback(i, x, denoised)
    return x


def sample_dpmpp_sde(denoise: Denoise, x, sigmas, noise: Noise, eta=1.0, s_noise=1.0, r=0.5, callback=_noop):
    """DPM-Solver++ SDE (k-diffusion sample_dpmpp_sde): ancestral DPM-Solver++ stages to lambda + r h, then + h."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i])
        if sigma_next == 0:
            x = x + (x - denoised) / np.float32(sigma) * np.float32(sigma_next - sigma)
        else:
            sigma_s = sigma * (sigma_next / sigma) ** r  # lambda + r h, with lambda = -log sigma
            sigma_down, sigma_up = ancestral_step(sigma, sigma_s, eta)
            x_2 = np.float32(sigma_down / sigma) * x - np.float32(sigma_down / sigma - 1) * denoised
            z_first = noise()
            x_2 = x_2 + z_first * np.float32(sigma_up * s_noise)
            denoised_2 = denoise(x_2, sigma_s, intermediate=True)
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
            fac = 1 / (2 * r)
            denoised_d = np.float32(1 - fac) * denoised + np.float32(fac) * denoised_2
            x = np.float32(sigma_down / sigma) * x - np.float32(sigma_down / sigma - 1) * denoised_d
            z = brownian_noise(z_first, noise(), sigma, sigma_s, sigma_next)
            x = x + z * np.float32(sigma_up * s_noise)
        callback(i, x, denoised)
    return x


def sample_dpmpp_2m_sde(
    denoise: Denoise, x, sigmas, noise: Noise, eta=1.0, s_noise=1.0, solver_type="midpoint", callback=_noop
):
    """k-diffusion's sample_dpmpp_2m_sde: dpmpp_2m_sde on its variance-exploding path."""
    return dpmpp_2m_sde(VARIANCE_EXPLODING, denoise, x, sigmas, noise, eta, s_noise, solver_type, callback)


def dpmpp_2m_sde(
    path: NoisePath, denoise: Denoise, x, sigmas, noise: Noise, eta=1.0, s_noise=1.0, solver_type="midpoint",
    callback=_noop,
):  # fmt: skip
    """DPM-Solver++(2M) SDE (Lu et al. 2022) on PATH: k-diffusion's sample_dpmpp_2m_sde on its variance-exploding
    path (alpha = 1), the general form as ComfyUI writes it for flow models on the flow path (flow_samplers.py). Its
    second-order correction in the midpoint form or, SOLVER_TYPE "heun", the Heun form (A1111's DPM++ 2M SDE Heun);
    x = D(x) at the end. A step from lambda = -inf (the flow path's sigma = 1) is first order."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i])
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h, alpha_next = path.log_snr_step(sigma, sigma_next), path.alpha(sigma_next)  # h > 0, inf from lambda -inf
            eta_h = eta * h if eta else 0.0
            data_weight = alpha_next * -math.expm1(-h - eta_h)
            x = np.float32(sigma_next / sigma * math.exp(-eta_h)) * x + np.float32(data_weight) * denoised
            if old_denoised is not None and math.isfinite(h_last) and solver_type == "heun":
                gain = alpha_next * (1 + math.expm1(-h - eta_h) / (h + eta_h)) * h / h_last
                x = x + np.float32(gain) * (denoised - old_denoised)
            elif old_denoised is not None and math.isfinite(h_last):
                x = x + np.float32(0.5 * data_weight * h / h_last) * (denoised - old_denoised)
            if eta:
                x = x + noise() * np.float32(sigma_next * (-math.expm1(-2 * eta_h)) ** 0.5 * s_noise)
        old_denoised, h_last = denoised, h
        callback(i, x, denoised)
    return x


def sample_dpmpp_3m_sde(denoise: Denoise, x, sigmas, noise: Noise, eta=1.0, s_noise=1.0, callback=_noop):
    """DPM-Solver++(3M) SDE (k-diffusion sample_dpmpp_3m_sde): orders 1, 2, then 3 from step 3; x = D(x) at the end."""
    denoised_1, denoised_2, h_1, h_2 = None, None, None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i])
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            h_eta = h * (eta + 1)
            x = np.float32(math.exp(-h_eta)) * x + np.float32(-math.expm1(-h_eta)) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / np.float32(r0)
                d1_1 = (denoised_1 - denoised_2) / np.float32(r1)
                d1 = d1_0 + (d1_0 - d1_1) * np.float32(r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / np.float32(r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + np.float32(phi_2) * d1 - np.float32(phi_3) * d2
            elif h_1 is not None:
                x = x + np.float32(phi_2 * h / h_1) * (denoised - denoised_1)
            if eta:
                x = x + noise() * np.float32(sigma_next * (-math.expm1(-2 * h * eta)) ** 0.5 * s_noise)
        denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
        callback(i, x, denoised)
    return x
