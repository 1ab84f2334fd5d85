"""Samplers as small pure functions over an explicit sigma array (k-diffusion's formulation).

Every sampler takes `denoise(x, sigma) -> x0 estimate`, the starting x (noise scaled to sigmas[0]) and
the sigmas, and returns x at sigmas[-1]. x is float32 (B, C, H/8, W/8) in x0 + sigma * eps units.
`noise()` returns a fresh unit-normal array shaped like x (drawn per image, see rng.py);
`callback(i, x, denoised)` runs after step i. A multi-stage step evaluates its intermediate points with
`denoise(x, sigma, intermediate=True)`: the UNet then gets sigma_to_t(sigma), never a schedule timestep.
"""

import math
from collections.abc import Callable

import numpy as np

from sdrt.errors import InvalidOption

Denoise = Callable[..., np.ndarray]  # (x, sigma, intermediate=False) -> x0 estimate
Noise = Callable[[], np.ndarray]


def _noop(i, x, denoised):
    return None


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step: deterministic move to sigma_down, then add sigma_up noise."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


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


# Adams-Bashforth weights of orders 1 to 4 on equal steps, newest derivative first (PNDM's PLMS, Liu et al. 2022 eq. 12)
ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def sample_plms(denoise: Denoise, x, sigmas, noise: Noise | None = None, callback=_noop):
    """PLMS (Liu et al. 2022, eq. 12): Adams-Bashforth on eps, started by a pseudo improved Euler step.

    In x0 + sigma * eps units PNDM's transfer step (eq. 11) is the Euler (DDIM) step. As CompVis' and diffusers'
    PLMS (skip_prk_steps) do, the first of several steps is re-run with the mean of the eps at both of its ends, and
    the eps history of orders 2 to 4 keeps the first step's start: steps + 1 UNet calls in all.
    """
    steps = len(sigmas) - 1
    history = []  # (B, C, h, w) float32 eps of the previous steps, oldest first, at most 3
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        eps = (x - denoised) / np.float32(sigma)
        if i == 0 and steps > 1:  # pseudo improved Euler: one more UNet call at the end of the Euler step
            x_end = x + eps * np.float32(sigma_next - sigma)
            eps_end = (x_end - denoise(x_end, sigma_next)) / np.float32(sigma_next)
            slope = (eps + eps_end) * np.float32(0.5)
        else:
            weights = ADAMS_BASHFORTH[len(history)]
            slope = sum(np.float32(w) * e for w, e in zip(weights, [eps, *history[::-1]], strict=True))
        history = [*history, eps][-(len(ADAMS_BASHFORTH) - 1) :]
        x = x + slope * np.float32(sigma_next - sigma)
        callback(i, x, denoised)
    return x


UNIPC_VARIANTS = ("bh1", "bh2")  # B(h) = h or e^h - 1 (Zhao et al. 2023, section 3.3); diffusers' default bh2
UNIPC_ORDER = 2  # diffusers' UniPCMultistepScheduler default solver_order


def unipc_step(x, sigmas_done, denoised_done, sigma_next: float, order: int, variant: str, denoised_next=None):
    """One UniP-p step (Zhao et al. 2023, Alg. 2, data prediction) from x at sigmas_done[-1] to sigma_next.

    With DENOISED_NEXT (D at the predicted point), the UniC-p corrector instead: it re-does the step from x using
    that evaluation too (Alg. 1). sigmas_done / denoised_done: the last evaluations, newest last (order of them).
    lambda = -log(sigma) is the half log-SNR; all in x0 + sigma * eps units.
    """
    sigma, m0 = float(sigmas_done[-1]), denoised_done[-1]
    h = (-math.log(sigma_next) if sigma_next > 0 else math.inf) + math.log(sigma)
    hh = -h  # data prediction integrates over -h
    h_phi_1 = math.expm1(hh)  # h phi_1(h) = e^h - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks, diffs = [], []  # r_k = (lambda_k - lambda_0) / h and D_k = (m_k - m_0) / r_k for the older evaluations
    for k in range(1, order):
        rk = (math.log(sigma) - math.log(float(sigmas_done[-1 - k]))) / h
        rks.append(rk)
        diffs.append((denoised_done[-1 - k] - m0) / np.float32(rk))
    rks.append(1.0)
    # b_i = i! h phi_{i+1}(h) / B(h), phi_{k+1}(h) = (phi_k(h) - 1/k!) / h (Alg. 2 lines 3-6)
    b, phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        b.append(phi_k * factorial / b_h)
        factorial *= i + 1
        phi_k = phi_k / hh - 1 / factorial
    vander = np.array([[r ** (i - 1) for r in rks] for i in range(1, order + 1)])  # R_p(h)
    x_next = np.float32(sigma_next / sigma) * x - np.float32(h_phi_1) * m0
    # The one-unknown systems (UniC-1, UniP-2) take rho = 1/2, the second-order choice of the paper and diffusers.
    if denoised_next is not None:  # UniC
        rhos = [0.5] if order == 1 else np.linalg.solve(vander, np.array(b)).tolist()
        diffs.append(denoised_next - m0)
    elif order == 1:
        rhos = []
    else:  # UniP
        rhos = [0.5] if order == 2 else np.linalg.solve(vander[:-1, :-1], np.array(b[:-1])).tolist()
    if not rhos:  # first order: the DPM-Solver++(1) step (also the B(h) = -inf limit of bh1 at sigma_next = 0)
        return x_next
    correction = sum(np.float32(rho) * d for rho, d in zip(rhos, diffs, strict=True))
    return x_next - np.float32(b_h) * correction


def sample_unipc(
    denoise: Denoise, x, sigmas, noise: Noise | None = None, order=UNIPC_ORDER, variant="bh2", callback=_noop
):
    """UniPC (Zhao et al. 2023): UniP-p predictor and UniC corrector, multistep on the data prediction.

    As diffusers' UniPCMultistepScheduler: order 1 on the first step, rising to ORDER (warm-up), and falling again
    on the last steps (lower_order_final); every evaluation after the first corrects the step that led to it.
    """
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"UniPC variant {variant!r}: expected one of {', '.join(UNIPC_VARIANTS)}")
    steps = len(sigmas) - 1
    sigmas_done, denoised_done = [], []  # the last ORDER evaluations, newest last
    x_start, last_order = x, 0
    for i in range(steps):
        denoised = denoise(x, sigmas[i])
        if i > 0:
            x = unipc_step(x_start, sigmas_done, denoised_done, float(sigmas[i]), last_order, variant, denoised)
        sigmas_done, denoised_done = [*sigmas_done, sigmas[i]][-order:], [*denoised_done, denoised][-order:]
        last_order = min(order, steps - i, len(denoised_done))
        x_start = x
        x = unipc_step(x, sigmas_done, denoised_done, float(sigmas[i + 1]), last_order, variant)
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


def log_midpoint(sigma_from: float, sigma_to: float) -> float:
    """The sigma halfway between two sigmas in log sigma (their geometric mean): DPM-Solver-2's intermediate point."""
    return float(sigma_from * sigma_to) ** 0.5


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


LMS_ORDER = 4  # k-diffusion's and diffusers' default order of the linear multistep method


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> np.ndarray:
    """(order,) weights of the slopes at sigmas[i], sigmas[i-1], ...: their Lagrange basis polynomials' integrals."""
    # over the step sigmas[i] -> sigmas[i+1], in tau = sigma - sigmas[i] to keep the arithmetic well conditioned
    nodes = np.asarray(sigmas[i - order + 1 : i + 1][::-1], dtype=np.float64) - float(sigmas[i])  # node j: step i-j
    end = float(sigmas[i + 1]) - float(sigmas[i])
    weights = np.empty(order)
    for j in range(order):
        others = np.delete(nodes, j)
        basis = np.polynomial.Polynomial.fromroots(others) if others.size else np.polynomial.Polynomial(1.0)
        antiderivative = basis.integ()  # vanishes at 0, that is at sigmas[i]
        weights[j] = antiderivative(end) / np.prod(nodes[j] - others)
    return weights


def sample_lms(denoise: Denoise, x, sigmas, noise: Noise | None = None, order=LMS_ORDER, callback=_noop):
    """Linear multistep method on the probability-flow ODE with the last `order` slopes (k-diffusion sample_lms)."""
    derivatives = []  # newest last
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = denoise(x, sigma)
        derivatives.append((x - denoised) / sigma)
        del derivatives[:-order]
        weights = lms_coefficients(sigmas, i, min(i + 1, order))
        for weight, derivative in zip(weights, reversed(derivatives), strict=True):
            x = x + derivative * np.float32(weight)
        callback(i, x, denoised)
    return x


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


def sample_dpmpp_2m_sde(denoise: Denoise, x, sigmas, noise: Noise, eta=1.0, s_noise=1.0, callback=_noop):
    """DPM-Solver++(2M) SDE, midpoint form (Lu et al. 2022; k-diffusion sample_dpmpp_2m_sde); x = D(x) at the end."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i])
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)  # lambda(sigma_next) - lambda(sigma), lambda = -log sigma
            eta_h = eta * h
            data_weight = -math.expm1(-h - eta_h)
            x = np.float32(sigma_next / sigma * math.exp(-eta_h)) * x + np.float32(data_weight) * denoised
            if old_denoised is not None:
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


# A1111 sampler name -> (function name here, diffusers timestep rule in schedules.py).
SAMPLERS = {
    "Euler": ("sample_euler", "euler"),
    "Euler a": ("sample_euler_ancestral", "euler"),
    "DDIM": ("sample_ddim", "ddim"),
    "PLMS": ("sample_plms", "pndm"),
    "UniPC": ("sample_unipc", "dpmsolver"),
    "LCM": ("sample_lcm", "lcm"),
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
    "DPM fast": ("sample_dpm_fast", "euler"),  # samplers_extra.py
    "DPM adaptive": ("sample_dpm_adaptive", "euler"),  # samplers_extra.py
}
# Each sampler's keyword arguments beyond (denoise, x, sigmas, noise, callback): its whole contract (k-diffusion's
# meanings). The user's knobs (eta, s_noise, s_churn, s_tmin, s_tmax) reach only the samplers that take them, as in
# A1111 where Euler ignores eta; clip_denoised (DDIM) and timesteps/timestep_scaling (LCM) come from the model.
_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
_ANCESTRAL = ("eta", "s_noise")
SAMPLER_ARGUMENTS = {
    "sample_euler": _CHURN,
    "sample_euler_ancestral": _ANCESTRAL,
    "sample_ddim": ("eta", "clip_denoised"),
    "sample_plms": (),
    "sample_unipc": ("order", "variant"),
    "sample_lcm": ("timesteps", "timestep_scaling"),
    "sample_dpmpp_2m": (),
    "sample_heun": _CHURN,
    "sample_dpm_2": _CHURN,
    "sample_dpm_2_ancestral": _ANCESTRAL,
    "sample_lms": ("order",),
    "sample_dpmpp_2s_ancestral": _ANCESTRAL,
    "sample_dpmpp_sde": ("eta", "s_noise", "r"),
    "sample_dpmpp_2m_sde": _ANCESTRAL,
    "sample_dpmpp_3m_sde": _ANCESTRAL,
    "sample_restart": ("s_noise",),
    "sample_dpm_fast": _ANCESTRAL,
    "sample_dpm_adaptive": _ANCESTRAL,
}


def sampler_function(name: str):
    """(function, the keyword arguments it takes) of an A1111 sampler name (resolved)."""
    function = SAMPLERS[name][0]
    if function not in globals():  # the samplers A1111 1.10 added live in samplers_extra.py
        from sdrt.runtime import samplers_extra

        return getattr(samplers_extra, function), SAMPLER_ARGUMENTS[function]
    return globals()[function], SAMPLER_ARGUMENTS[function]


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
    "restart": "Restart",
    "k_dpm_fast": "DPM fast",
    "k_dpm_ad": "DPM adaptive",
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
