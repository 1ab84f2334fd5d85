"""The linear multistep samplers, which reuse the denoised estimates of earlier steps: PLMS (PNDM's
Adams-Bashforth form), UniPC (Zhao et al. 2023) and LMS (k-diffusion's); samplers.py holds the table."""

import math

import numpy as np

from sdrt.runtime.sampler_kit import Denoise, Noise
from sdrt.runtime.sampler_kit import no_callback as _noop

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
