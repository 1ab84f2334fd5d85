"""A1111 1.10's schedule types sdrt adds (Polyexponential, KL Optimal, Align Your Steps, Normal, DDIM) against
references written here in torch from A1111's modules/sd_schedulers.py and k-diffusion's DiscreteSchedule (k-diffusion
itself needs torchvision, which this environment cannot install beside its CPU torch). Sigmas within 1e-5 relative;
each check has a twin showing a plausible wrong schedule misses it."""

import numpy as np
import pytest
import torch
from tiny_sd import SD15_SCHEDULER_KWARGS

from sdrt.runtime.manifest import SchedulerConfig
from sdrt.runtime.schedules import build_schedule, train_sigmas

RTOL = 1e-5
CFG = SchedulerConfig(**SD15_SCHEDULER_KWARGS)
AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


class Discrete:
    """k-diffusion's DiscreteSchedule over the model's training sigmas: sigma_to_t and t_to_sigma in log sigma."""

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas, self.log_sigmas = sigmas, sigmas.log()

    def sigma_to_t(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high = low + 1
        w = ((self.log_sigmas[low] - log_sigma) / (self.log_sigmas[low] - self.log_sigmas[high])).clamp(0, 1)
        return ((1 - w) * low + w * high).view(sigma.shape)

    def t_to_sigma(self, t):
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


def model() -> Discrete:
    return Discrete(torch.tensor(train_sigmas(CFG), dtype=torch.float64))


def reference(name: str, n: int, sdxl: bool = False) -> np.ndarray:
    """A1111's sigmas (with the final one) for the schedule NAME, n steps, on the SD 1.5 training sigmas."""
    m = model()
    sigma_min, sigma_max = m.sigmas[0].item(), m.sigmas[-1].item()
    if name == "polyexponential":  # k-diffusion get_sigmas_polyexponential, rho = A1111's default 1
        ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** 1.0
        sigmas = torch.exp(ramp * (np.log(sigma_max) - np.log(sigma_min)) + np.log(sigma_min))
        return torch.cat([sigmas, sigmas.new_zeros([1])]).numpy()
    if name == "kl_optimal":
        alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
        i = torch.arange(n + 1, dtype=torch.float64)
        return torch.tan(i / n * alpha_min + (1.0 - i / n) * alpha_max).numpy()
    if name == "align_your_steps":
        table = AYS_SDXL if sdxl else AYS_SD15
        if n == len(table):
            return np.array([*table, 0.0])
        xs, ys = np.linspace(0, 1, len(table)), np.log(table[::-1])
        return np.append(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1], 0.0)
    if name == "normal":
        start, end = m.sigma_to_t(torch.tensor(sigma_max)), m.sigma_to_t(torch.tensor(sigma_min))
        return np.array([m.t_to_sigma(t).item() for t in torch.linspace(start.item(), end.item(), n)] + [0.0])
    if name == "ddim":
        stride, x, sigmas = max(len(m.sigmas) // n, 1), 1, []
        while x < len(m.sigmas):
            sigmas.append(m.sigmas[x].item())
            x += stride
        return np.array(sigmas[::-1] + [0.0])
    raise ValueError(name)


@pytest.mark.parametrize("steps", [1, 7, 11, 20, 30])
@pytest.mark.parametrize("name", ["polyexponential", "kl_optimal", "align_your_steps", "normal", "ddim"])
def test_sigmas_match_a1111(name, steps):
    ours = build_schedule(CFG, steps, "euler", name)
    want = reference(name, steps)
    assert len(ours.sigmas) == len(want)
    np.testing.assert_allclose(ours.sigmas, want, rtol=RTOL, atol=1e-7)
    assert ours.initial_noise_scale == pytest.approx(ours.sigmas[0], rel=1e-6)  # k-diffusion: x = sigma_max * noise
    # the UNet timesteps are the sigmas' (k-diffusion's sigma_to_t)
    t = model().sigma_to_t(torch.tensor(ours.sigmas[:-1], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(ours.timesteps, t, atol=2e-3)


def test_quirks_kept_and_twins_fail():
    """KL Optimal ends at sigma_min, not 0; A1111's DDIM grid has steps + 1 sigmas when steps does not divide 1000
    evenly (30 -> stride 33 -> 31 sigmas); SDXL has its own Align Your Steps table; Polyexponential (rho 1) is
    Exponential. Each wrong version misses."""
    kl = build_schedule(CFG, 10, "euler", "kl_optimal").sigmas
    assert kl[-1] == pytest.approx(train_sigmas(CFG)[0], rel=1e-6) and kl[-1] > 0
    assert len(build_schedule(CFG, 30, "euler", "ddim").sigmas) == 32
    from sdrt.runtime.families import registry

    families = registry()
    sd15 = build_schedule(CFG, 10, "euler", "align_your_steps", ays_table=families["sd1"].align_your_steps).sigmas
    sdxl = build_schedule(CFG, 10, "euler", "align_your_steps", ays_table=families["sdxl"].align_your_steps).sigmas
    np.testing.assert_allclose(sdxl, reference("align_your_steps", 10, sdxl=True), rtol=RTOL, atol=1e-7)
    assert np.abs(sd15 - sdxl).max() > 0.1
    poly = build_schedule(CFG, 12, "euler", "polyexponential").sigmas
    np.testing.assert_allclose(poly, build_schedule(CFG, 12, "euler", "exponential").sigmas, rtol=1e-5)
    normal = build_schedule(CFG, 12, "euler", "normal").sigmas
    assert np.abs(normal - reference("kl_optimal", 12)).max() > 0.1  # a wrong formula would not pass the match


def test_new_schedules_generate_and_round_trip(tiny_pipeline):
    """Each generates (different images), and its infotext label reads back as the same schedule."""
    from sdrt.runtime.infotext import generate_kwargs, parse_infotext
    from sdrt.runtime.schedules import resolve_scheduler

    images = {}
    for name in ("polyexponential", "kl_optimal", "align_your_steps", "normal", "ddim"):
        image = tiny_pipeline.generate("a cat", width=64, height=64, steps=6, seed=2, scheduler=name, progress=False)[0]
        label = generate_kwargs(parse_infotext(image.info["parameters"]))["scheduler"]
        assert resolve_scheduler(label) == name
        images[name] = np.asarray(image, dtype=np.int16)
    assert np.abs(images["kl_optimal"] - images["ddim"]).max() > 0


def test_schedulers_route_lists_them():
    from sdrt.server.a1111 import schedulers_list

    listed = {s["name"]: s for s in schedulers_list()}
    assert listed["kl_optimal"]["label"] == "KL Optimal" and listed["align_your_steps"]["label"] == "Align Your Steps"
    assert listed["polyexponential"]["default_rho"] == 1.0 and listed["ddim"]["need_inner_model"] is True
