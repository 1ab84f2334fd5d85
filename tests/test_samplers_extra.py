"""Restart, DPM fast and DPM adaptive (A1111 1.10's samplers sdrt lacked) against references written here in torch
from A1111's restart_sampler (modules/sd_samplers_extra.py) and k-diffusion's DPMSolver.dpm_solver_fast and
dpm_solver_adaptive (k-diffusion itself needs
torchvision, which this environment cannot install beside its CPU torch), on an analytic denoiser and the same
noise draws: final x within 1e-4 relative (float32 against float64). Each has a twin a plausible mistake fails."""

import math

import numpy as np
import pytest
import torch

from sdrt.runtime.flow_samplers import FLOW_PATH
from sdrt.runtime.sampler_kit import VARIANCE_EXPLODING
from sdrt.runtime.samplers import SAMPLERS, resolve_sampler, sampler_function
from sdrt.runtime.samplers_extra import dpm_fast_orders, restart_steps
from sdrt.runtime.samplers_sde import dpmpp_2m_sde

SHAPE = (2, 4, 3, 3)
RTOL = 1e-4


def toy_denoise(x, sigma):
    """An x0 estimate that depends on x and sigma non-linearly, the same in numpy and torch."""
    lib = torch if isinstance(x, torch.Tensor) else np
    return x / (1 + sigma**2) + 0.3 * lib.sin(x) / (1 + sigma)


class Draws:
    """The same unit-normal draws, in order, for sdrt (numpy float32) and the reference (torch float64)."""

    def __init__(self, seed=0, count=64):
        self.values = np.random.default_rng(seed).standard_normal((count, *SHAPE))
        self.used = 0

    def numpy(self):
        self.used += 1
        return self.values[self.used - 1].astype(np.float32)

    def torch(self):
        self.used += 1
        return torch.from_numpy(self.values[self.used - 1])


def sdrt_run(name, sigmas, seed=0, **kwargs):
    fn, _ = sampler_function(name)
    draws = Draws(seed)
    x = (Draws(99).values[0] * sigmas[0]).astype(np.float32)
    out = fn(lambda x, s, intermediate=False: toy_denoise(x, np.float32(s)), x, np.asarray(sigmas, np.float32),
             noise=draws.numpy, **kwargs)  # fmt: skip
    return out.astype(np.float64), draws.used


def karras_ref(n, sigma_min, sigma_max, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(max_inv + ramp * (min_inv - max_inv)) ** rho, torch.zeros(1, dtype=torch.float64)])


def restart_ref(x, sigmas, draws, s_noise=1.0, restart=True):
    """A1111's restart_sampler with its automatic restart_list (RESTART=False: the twin without the restarts)."""
    steps = len(sigmas) - 1
    restart_list = {}
    if steps >= 20:
        restart_steps_, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = karras_ref(steps - restart_steps_ * restart_times, sigmas[-2].item(), sigmas[0].item())
        restart_list = {0.1: [restart_steps_ + 1, restart_times, 2]} if restart else {}
    restart_list = {int(torch.argmin(abs(sigmas - key))): value for key, value in restart_list.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            count, times, top = restart_list[i + 1]
            max_idx = int(torch.argmin(abs(sigmas - top)))
            if max_idx < i + 1:
                back = karras_ref(count, sigmas[i + 1].item(), sigmas[max_idx].item())[:-1]
                for _ in range(times):
                    step_list.extend(zip(back[:-1], back[1:], strict=True))
    last = None
    for old, new in step_list:
        if last is None:
            last = old
        elif last < old:
            x = x + draws.torch() * s_noise * (old**2 - last**2) ** 0.5
        d = (x - toy_denoise(x, old)) / old
        if new == 0:
            x = x + d * (new - old)
        else:
            x_2 = x + d * (new - old)
            d_2 = (x_2 - toy_denoise(x_2, new)) / new
            x = x + (d + d_2) / 2 * (new - old)
        last = new
    return x.numpy(), len(step_list)


def dpm_fast_ref(x, sigma_min, sigma_max, nfe, draws, eta=1.0, s_noise=1.0, orders=None):
    """k-diffusion's sample_dpm_fast (DPMSolver.dpm_solver_fast with its 1-, 2- and 3-step solvers)."""

    def sigma(t):
        return math.exp(-t)

    def eps(x, t):
        return (x - toy_denoise(x, sigma(t))) / sigma(t)

    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    m = math.floor(nfe / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1, dtype=torch.float64)
    if orders is None:
        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i].item(), ts[i + 1].item()
        su = 0.0
        if eta:
            s_from, s_to = sigma(t), sigma(t_next)
            s_up = min(s_to, eta * (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5)
            s_down = (s_to**2 - s_up**2) ** 0.5
            t_next_ = min(t_end, -math.log(s_down))
            su = (sigma(t_next) ** 2 - sigma(t_next_) ** 2) ** 0.5
        else:
            t_next_ = t_next
        e = eps(x, t)
        h = t_next_ - t
        if order == 1:
            x = x - sigma(t_next_) * math.expm1(h) * e
        elif order == 2:
            s1 = t + h / 2
            u1 = x - sigma(s1) * math.expm1(h / 2) * e
            x = x - sigma(t_next_) * math.expm1(h) * e - sigma(t_next_) / (2 * 0.5) * math.expm1(h) * (eps(u1, s1) - e)
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = t + r1 * h, t + r2 * h
            u1 = x - sigma(s1) * math.expm1(r1 * h) * e
            e1 = eps(u1, s1)
            phi2 = math.expm1(r2 * h)
            u2 = x - sigma(s2) * phi2 * e - sigma(s2) * (r2 / r1) * (phi2 / (r2 * h) - 1) * (e1 - e)
            e2 = eps(u2, s2)
            x = x - sigma(t_next_) * math.expm1(h) * e - sigma(t_next_) / r2 * (math.expm1(h) / h - 1) * (e2 - e)
        x = x + su * s_noise * draws.torch()
    return x.numpy()


def dpm_adaptive_ref(x, sigma_min, sigma_max, draws, eta=1.0, s_noise=1.0, rtol=0.05, atol=0.0078):
    """k-diffusion's sample_dpm_adaptive (order 3: DPM-Solver-2 with r1 = 1/3 against -3, PID on the error)."""

    def sigma(t):
        return math.exp(-t)

    def eps(x, t):
        return (x - toy_denoise(x, sigma(t))) / sigma(t)

    s, t_end = -math.log(sigma_max), -math.log(sigma_min)
    h, errs, b1, x_prev, steps = 0.05, [], 1.0 / (1.5 if eta else 3), x, 0
    while s < t_end - 1e-5:
        t = min(t_end, s + h)
        if eta:
            s_from, s_to = sigma(s), sigma(t)
            s_up = min(s_to, eta * (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5)
            t_ = min(t_end, -math.log((s_to**2 - s_up**2) ** 0.5))
            su = (sigma(t) ** 2 - sigma(t_) ** 2) ** 0.5
        else:
            t_, su = t, 0.0
        e = eps(x, s)
        hh, r1, r2 = t_ - s, 1 / 3, 2 / 3
        s1, s2 = s + r1 * hh, s + r2 * hh
        e1 = eps(x - sigma(s1) * math.expm1(r1 * hh) * e, s1)
        x_low = x - sigma(t_) * math.expm1(hh) * e - sigma(t_) / (2 * r1) * math.expm1(hh) * (e1 - e)
        phi2 = math.expm1(r2 * hh)
        e2 = eps(x - sigma(s2) * phi2 * e - sigma(s2) * (r2 / r1) * (phi2 / (r2 * hh) - 1) * (e1 - e), s2)
        x_high = x - sigma(t_) * math.expm1(hh) * e - sigma(t_) / r2 * (math.expm1(hh) / hh - 1) * (e2 - e)
        delta = torch.maximum(torch.tensor(atol), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        inv = 1 / (float(error) + 1e-8)
        errs = errs or [inv, inv, inv]
        errs[0] = inv
        factor = 1 + math.atan(errs[0] ** b1 - 1)  # pcoeff = dcoeff = 0: only the integral term
        if factor >= 0.81:
            errs[2], errs[1] = errs[1], errs[0]
            x_prev, x, s = x_low, x_high + su * s_noise * draws.torch(), t
        h *= factor
        steps += 1
    return x.numpy(), steps


def dpmpp_2m_sde_ref(x, sigmas, draws, eta=1.0, s_noise=1.0, solver_type="heun"):
    """k-diffusion's sample_dpmpp_2m_sde (noise from DRAWS in place of its Brownian tree)."""
    old_denoised, h_last, h = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = toy_denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * math.exp(-eta_h) * x + (-math.expm1(-h - eta_h)) * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-math.expm1(-h - eta_h)) / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * (-math.expm1(-h - eta_h)) * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + draws.torch() * sigmas[i + 1] * (-math.expm1(-2 * eta_h)) ** 0.5 * s_noise
        old_denoised, h_last = denoised, h
    return x.numpy()


def start():
    return torch.from_numpy(Draws(99).values[0])


@pytest.mark.parametrize("steps", [8, 20, 40])
def test_restart_matches_a1111(steps):
    sigmas = np.append(np.exp(np.linspace(math.log(14.6), math.log(0.03), steps)), 0.0)
    ours, used = sdrt_run("Restart", sigmas)
    want, walked = restart_ref(start() * float(np.float32(sigmas[0])), torch.tensor(sigmas, dtype=torch.float64),
                               Draws())  # fmt: skip
    assert len(restart_steps(sigmas)) == walked
    np.testing.assert_allclose(ours, want, rtol=RTOL, atol=1e-5)
    assert used == (0 if steps < 20 else 1 if steps < 36 else 2)  # one noise draw per restart
    if steps >= 20:  # the twin: without the restarts the result is another
        plain, _ = restart_ref(start() * float(np.float32(sigmas[0])), torch.tensor(sigmas, dtype=torch.float64),
                               Draws(), restart=False)  # fmt: skip
        assert np.abs(plain - ours).max() > 1e-3


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [5, 6, 10])
def test_dpm_fast_matches_k_diffusion(steps, eta):
    sigmas = np.append(np.exp(np.linspace(math.log(14.6), math.log(0.03), steps)), 0.0)
    ours, _ = sdrt_run("DPM fast", sigmas, eta=eta)
    sigma_max, sigma_min = float(np.float32(sigmas[0])), float(np.float32(sigmas[-2]))
    want = dpm_fast_ref(start() * sigma_max, sigma_min, sigma_max, steps, Draws(), eta=eta)
    np.testing.assert_allclose(ours, want, rtol=RTOL, atol=1e-5)
    wrong = dpm_fast_ref(start() * sigma_max, sigma_min, sigma_max, steps, Draws(), eta=eta,
                         orders=[1] * len(dpm_fast_orders(steps)))  # fmt: skip
    assert np.abs(wrong - ours).max() > 1e-3


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_adaptive_matches_k_diffusion(eta):
    """Same steps tried (the error control's decisions agree) and the same result; a tighter tolerance (rtol 1e-4)
    takes more steps and ends elsewhere."""
    sigmas = np.append(np.exp(np.linspace(math.log(14.6), math.log(0.03), 10)), 0.0)
    tried = []
    fn, _ = sampler_function("DPM adaptive")
    x = (Draws(99).values[0] * sigmas[0]).astype(np.float32)
    ours = fn(lambda x, s, intermediate=False: toy_denoise(x, np.float32(s)), x, np.asarray(sigmas, np.float32),
              noise=Draws().numpy, eta=eta, callback=lambda i, x, d: tried.append(i))  # fmt: skip
    sigma_max, sigma_min = float(np.float32(sigmas[0])), float(np.float32(sigmas[-2]))
    want, steps = dpm_adaptive_ref(start() * sigma_max, sigma_min, sigma_max, Draws(), eta=eta)
    assert len(tried) == steps
    np.testing.assert_allclose(ours.astype(np.float64), want, rtol=RTOL, atol=1e-4)
    tight, tight_steps = dpm_adaptive_ref(start() * sigma_max, sigma_min, sigma_max, Draws(), eta=eta, rtol=1e-4,
                                          atol=1e-5)  # fmt: skip
    assert tight_steps > steps and np.abs(tight - ours).max() > 1e-3


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpmpp_2m_sde_heun_matches_k_diffusion(eta):
    """A1111's DPM++ 2M SDE Heun is k-diffusion's 2M SDE with solver_type "heun"; the midpoint form (sdrt's DPM++ 2M
    SDE) is another result."""
    sigmas = np.append(np.exp(np.linspace(math.log(14.6), math.log(0.03), 8)), 0.0)
    ours, _ = sdrt_run("DPM++ 2M SDE Heun", sigmas, eta=eta)
    as_f32 = [float(v) for v in np.asarray(sigmas, np.float32)]
    want = dpmpp_2m_sde_ref(start() * as_f32[0], as_f32, Draws(), eta=eta)
    np.testing.assert_allclose(ours, want, rtol=RTOL, atol=1e-5)
    midpoint, _ = sdrt_run("DPM++ 2M SDE", sigmas, eta=eta)
    np.testing.assert_allclose(midpoint, dpmpp_2m_sde_ref(start() * as_f32[0], as_f32, Draws(), eta=eta,
                                                          solver_type="midpoint"), rtol=RTOL, atol=1e-5)  # fmt: skip
    assert np.abs(midpoint - ours).max() > 1e-3


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmpp_2m_sde_noise_path_is_the_only_difference(solver_type):
    """One DPM-Solver++(2M) SDE serves the UNet and flow families: on k-diffusion's path (alpha = 1, lambda =
    -log sigma) it is k-diffusion's algorithm, also on sigmas below 1; the flow path (alpha = 1 - sigma) on the same
    sigmas gives another result (the twin: the path is what the flow families change)."""
    sigmas = np.append(np.exp(np.linspace(math.log(0.95), math.log(0.03), 8)), 0.0)
    as_f32 = [float(v) for v in np.asarray(sigmas, np.float32)]
    want = dpmpp_2m_sde_ref(start() * as_f32[0], as_f32, Draws(), solver_type=solver_type)
    x = (Draws(99).values[0] * as_f32[0]).astype(np.float32)

    def run(path):
        return dpmpp_2m_sde(path, lambda x, s: toy_denoise(x, np.float32(s)), x, np.asarray(sigmas, np.float32),
                            Draws().numpy, solver_type=solver_type).astype(np.float64)  # fmt: skip

    np.testing.assert_allclose(run(VARIANCE_EXPLODING), want, rtol=RTOL, atol=1e-5)
    assert np.abs(run(FLOW_PATH) - want).max() > 1e-2


def test_dpm_fast_orders_spend_the_steps():
    for nfe in range(1, 40):
        assert sum(dpm_fast_orders(nfe)) == nfe


def test_names_aliases_and_pipeline(tiny_pipeline):
    assert {"Restart", "DPM fast", "DPM adaptive"} <= set(SAMPLERS)
    assert resolve_sampler("k_dpm_ad", "automatic") == ("DPM adaptive", "automatic")
    assert resolve_sampler("k_dpmpp_2m_sde_heun", "karras") == ("DPM++ 2M SDE Heun", "karras")
    assert resolve_sampler("k_dpm_fast", "automatic") == ("DPM fast", "automatic")
    assert resolve_sampler("restart", "automatic") == ("Restart", "automatic")
    images = {}
    for name in ("Restart", "DPM fast", "DPM adaptive", "DPM++ 2M SDE Heun"):
        image = tiny_pipeline.generate("a cat", width=64, height=64, steps=20, seed=3, sampler=name, progress=False)[0]
        assert f"Sampler: {name}," in image.info["parameters"]
        images[name] = np.asarray(image, dtype=np.int16)
    assert np.abs(images["Restart"] - images["DPM fast"]).max() > 0
