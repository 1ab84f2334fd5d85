"""Noise schedules: training sigmas, diffusers' timestep spacings, and A1111's schedule types, in numpy.

A schedule is an explicit array of sigmas (variance-exploding parameterisation, x = x0 + sigma * eps)
together with the UNet timestep of each sigma. Which diffusers scheduler class a sampler reproduces
decides the spacing rule and the scale of the initial noise, so those are chosen per "timestep rule".
The schedule type ("automatic", "karras", ...) then picks the sigmas, as A1111's "Schedule type" does.
"""

import math
from dataclasses import dataclass, replace

import numpy as np

from sdrt.errors import InvalidOption
from sdrt.runtime.a1111_schedules import A1111_SCHEDULES, a1111_schedule
from sdrt.runtime.manifest import SchedulerConfig
from sdrt.runtime.sigma_time import sigma_to_t, t_to_sigma  # noqa: F401 (also this module's names)

KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5
# Lee et al. 2024 ("Beta Sampling is All You Need"): Beta(0.6, 0.6), A1111's and diffusers' default.
BETA_SCHEDULE_ALPHA = 0.6
BETA_SCHEDULE_BETA = 0.6
SPACINGS = ("leading", "linspace", "trailing")
# diffusers' Euler* (also Heun, LMS, DPMSolverSDE), DDIM, DPMSolverMultistep (also UniPC: same set_timesteps),
# KDPM2* (KDPM2, KDPM2Ancestral), PNDM (PLMS), LCM and TCD rules
TIMESTEP_RULES = ("euler", "ddim", "dpmsolver", "kdpm2", "pndm", "lcm", "tcd")
SKIPPING_STEP_RULES = ("lcm", "tcd")  # timesteps from the distillation's grid (lcm_timesteps): no spacing
# What each diffusers class uses for a key the model's config does not set.
RULE_DEFAULTS = {
    "euler": {"timestep_spacing": "linspace", "set_alpha_to_one": False, "clip_sample": False},
    "ddim": {"timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": True},
    "dpmsolver": {"timestep_spacing": "linspace", "set_alpha_to_one": False, "clip_sample": False},
    "kdpm2": {"timestep_spacing": "linspace", "set_alpha_to_one": False, "clip_sample": False},
    "pndm": {"timestep_spacing": "leading", "set_alpha_to_one": False, "clip_sample": False},
    "lcm": {"timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": False},
    "tcd": {"timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": False},
}
# Schedule types (A1111's names). "automatic" is the sampler's diffusers class as configured.
SCHEDULES = ("automatic", "uniform", "karras", "exponential", "sgm_uniform", "simple", "beta", *A1111_SCHEDULES)
# A1111's schedules laid on the training timesteps themselves: the spacing rule plays no part.
TRAINING_GRID_SCHEDULES = ("uniform", "sgm_uniform", "simple")
# A formula between sigma_min and sigma_max. diffusers' DPMSolver*/UniPC take the whole training range; the other
# classes (and sdrt, for classes diffusers gives no such option) the range of the spaced sigmas.
SIGMA_RANGE_SCHEDULES = ("karras", "exponential", "beta")
FULL_RANGE_RULES = ("dpmsolver",)


@dataclass(frozen=True)
class Schedule:
    sigmas: np.ndarray  # (steps + 1,) float32, decreasing; the last is where sampling ends (0 or sigma_min)
    timesteps: np.ndarray  # (steps,) float32: the UNet timestep for each of sigmas[:-1]
    initial_noise_scale: float  # unit-normal noise times this is the starting x (diffusers' init_noise_sigma)

    @property
    def final_scale(self) -> float:
        """Factor from the final x (x0 + sigma * eps) to the variance-preserving latent the VAE decodes."""
        return float(1.0 / np.sqrt(1.0 + float(self.sigmas[-1]) ** 2))


def resolve_config(cfg: SchedulerConfig, rule: str) -> SchedulerConfig:
    """CFG with every key it leaves unset (None) given the default of RULE's diffusers class."""
    return replace(cfg, **{k: v for k, v in RULE_DEFAULTS[rule].items() if getattr(cfg, k) is None})


def train_betas(cfg: SchedulerConfig) -> np.ndarray:
    """(N,) float32 betas of the training noise schedule (DDPM, Ho et al. 2020; SD's scaled_linear)."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        return np.asarray(cfg.trained_betas, dtype=np.float32)
    if cfg.beta_schedule == "linear":
        return np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float64).astype(np.float32)
    if cfg.beta_schedule == "scaled_linear":
        return (np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=np.float64) ** 2).astype(np.float32)
    if cfg.beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17

        def alpha_bar(t):
            return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2

        t = np.arange(n, dtype=np.float64)
        return np.minimum(1 - alpha_bar((t + 1) / n) / alpha_bar(t / n), 0.999).astype(np.float32)
    raise ValueError(f"unsupported beta_schedule {cfg.beta_schedule!r}")


def train_alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """(N,) float32 cumulative product of (1 - beta), with zero terminal SNR if the config asks for it."""
    betas = train_betas(cfg)
    if cfg.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    acp = np.cumprod(1.0 - betas, dtype=np.float32)
    if cfg.rescale_betas_zero_snr:
        acp[-1] = 2.0**-24  # diffusers' stand-in for 0 so sigma stays finite
    return acp


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift/scale sqrt(alpha_bar) so the last timestep has zero SNR."""
    sqrt_acp = np.sqrt(np.cumprod(1.0 - betas.astype(np.float64)))
    first, last = sqrt_acp[0], sqrt_acp[-1]
    sqrt_acp = (sqrt_acp - last) * first / (first - last)
    acp = sqrt_acp**2
    alphas = np.concatenate([acp[:1], acp[1:] / acp[:-1]])
    return (1.0 - alphas).astype(np.float32)


def train_sigmas(cfg: SchedulerConfig) -> np.ndarray:
    """(N,) float32 sigma of each training timestep: sqrt((1 - alpha_bar) / alpha_bar)."""
    acp = train_alphas_cumprod(cfg)
    return np.sqrt((1.0 - acp) / acp).astype(np.float32)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras et al. 2022, eq. 5: n sigmas from sigma_max to sigma_min, evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas from sigma_max to sigma_min, evenly spaced in log sigma (k-diffusion's get_sigmas_exponential)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(
    sigma_min: float, sigma_max: float, n: int, alpha: float = BETA_SCHEDULE_ALPHA, beta: float = BETA_SCHEDULE_BETA
) -> np.ndarray:
    """Lee et al. 2024: sigma_min + F^-1(1 - i/(n-1)) (sigma_max - sigma_min), F the Beta(alpha, beta) CDF."""
    return sigma_min + beta_ppf(1.0 - np.linspace(0, 1, n), alpha, beta) * (sigma_max - sigma_min)


SIGMA_RANGE_FORMULAS = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}
BETAINC_TERMS = 200  # at most; the continued fraction converges in a few dozen where it is used (x below the mean)
BETAINC_TOLERANCE = 1e-15  # stop once a term changes the fraction by less than this (relative)
BETA_PPF_BISECTIONS = 53  # halvings of [0, 1]: down to float64 resolution


def betainc(a: float, b: float, x) -> np.ndarray:
    """Regularized incomplete beta I_x(a, b) (the Beta CDF) by its continued fraction (DLMF 8.17.22), Lentz's method."""
    x = np.asarray(x, dtype=np.float64)
    flip = x > (a + 1) / (a + b + 2)  # the fraction converges fast below the mean; use I_x(a,b) = 1 - I_1-x(b,a)
    p, q, z = np.where(flip, b, a), np.where(flip, a, b), np.where(flip, 1 - x, x)
    tiny = np.finfo(np.float64).tiny

    def guard(v):
        return np.where(np.abs(v) < tiny, tiny, v)

    c = np.ones_like(z)
    d = 1 / guard(1 - (p + q) * z / (p + 1))
    frac = d.copy()
    for m in range(1, BETAINC_TERMS + 1):
        for coef in (
            m * (q - m) * z / ((p + 2 * m - 1) * (p + 2 * m)),  # d_2m
            -(p + m) * (p + q + m) * z / ((p + 2 * m) * (p + 2 * m + 1)),  # d_2m+1
        ):
            d = 1 / guard(1 + coef * d)
            c = guard(1 + coef / c)
            frac *= c * d
        if np.all(np.abs(c * d - 1) < BETAINC_TOLERANCE):
            break
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)  # symmetric in a, b
    with np.errstate(divide="ignore"):
        front = np.exp(p * np.log(z) + q * np.log1p(-z) - log_beta) / p
    value = front * frac
    return np.where(flip, 1 - value, value)


def beta_ppf(quantiles, a: float, b: float) -> np.ndarray:
    """Inverse of the Beta(a, b) CDF by bisection (the CDF is increasing on [0, 1])."""
    quantiles = np.asarray(quantiles, dtype=np.float64)
    low, high = np.zeros_like(quantiles), np.ones_like(quantiles)
    for _ in range(BETA_PPF_BISECTIONS):
        mid = (low + high) / 2
        below = betainc(a, b, mid) < quantiles
        low, high = np.where(below, mid, low), np.where(below, high, mid)
    return np.where(quantiles <= 0, 0.0, np.where(quantiles >= 1, 1.0, (low + high) / 2))


def training_grid_timesteps(scheduler: str, steps: int, n: int) -> np.ndarray:
    """(steps,) decreasing fractional timesteps of A1111's uniform, sgm_uniform and simple schedules."""
    if scheduler == "uniform":  # k-diffusion DiscreteSchedule.get_sigmas: steps points from t_max to 0
        return np.linspace(n - 1, 0, steps)
    if scheduler == "sgm_uniform":  # steps + 1 points from t_max to 0, the last (t = 0) dropped
        return np.linspace(n - 1, 0, steps + 1)[:-1]
    if scheduler == "simple":  # every (n / steps)-th training timestep, counted down from the last
        return np.array([n - 1 - int(i * (n / steps)) for i in range(steps)], dtype=np.float64)
    raise ValueError(f"unsupported training-grid schedule {scheduler!r}")


def lcm_timesteps(cfg: SchedulerConfig, steps: int) -> np.ndarray:
    """(steps,) timesteps of diffusers' LCMScheduler: evenly picked from the distillation's skipping-step grid.

    Luo et al. 2023, section 4.3: distillation ran on original_inference_steps timesteps k - 1, 2k - 1, ..., N - 1.
    """
    original = cfg.original_inference_steps
    if not 1 <= steps <= original:
        raise ValueError(f"LCM takes 1 to {original} steps (original_inference_steps), not {steps}")
    k = cfg.num_train_timesteps // original
    grid = (np.arange(1, original + 1) * k - 1)[::-1]
    picks = np.floor(np.linspace(0, original, steps, endpoint=False)).astype(np.int64)
    return grid[picks].astype(np.float64)


def uses_spacing(rule: str, scheduler: str) -> bool:
    """Whether timestep_spacing changes the schedule of RULE under SCHEDULER."""
    if rule in SKIPPING_STEP_RULES or scheduler in TRAINING_GRID_SCHEDULES or scheduler in A1111_SCHEDULES:
        return False
    return not (rule in FULL_RANGE_RULES and scheduler in SIGMA_RANGE_SCHEDULES)


def spaced_timesteps(cfg: SchedulerConfig, steps: int, rule: str) -> np.ndarray:
    """(steps,) decreasing timesteps by cfg.timestep_spacing, exactly as the diffusers class for RULE does."""
    n, spacing = cfg.num_train_timesteps, cfg.timestep_spacing
    if spacing not in SPACINGS:
        raise ValueError(f"unsupported timestep_spacing {spacing!r}")
    if rule == "dpmsolver":  # DPMSolverMultistepScheduler spaces steps + 1 points and drops the last
        if spacing == "linspace":
            return np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.float64)
        if spacing == "leading":
            ratio = n // (steps + 1)
            return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.float64) + cfg.steps_offset
    if spacing == "linspace":
        t = np.linspace(0, n - 1, steps)[::-1]
        return t.round() if rule in ("ddim", "dpmsolver", "pndm") else t.astype(np.float32).astype(np.float64)
    if spacing == "leading":
        ratio = n // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float64) + cfg.steps_offset
    ratio = n / steps  # trailing
    return np.arange(n, 0, -ratio).round().astype(np.float64) - 1


def build_schedule(
    cfg: SchedulerConfig, steps: int, rule: str, scheduler: str, timestep_spacing: str | None = None, ays_table=None
) -> Schedule:
    """Sigmas and timesteps for STEPS steps under diffusers' RULE with the schedule type SCHEDULER (SCHEDULES).

    TIMESTEP_SPACING, when given, replaces the config's (and so the class default's) timestep_spacing; AYS_TABLE
    (the family's) is Align Your Steps' table.
    """
    if timestep_spacing is not None:
        cfg = replace(cfg, timestep_spacing=timestep_spacing)
    cfg = resolve_config(cfg, rule)
    sigmas_train = train_sigmas(cfg).astype(np.float64)
    # log in float32 as diffusers takes it: truncated UNet timesteps (999 vs 998) depend on the last bit
    log_sigmas = np.log(sigmas_train.astype(np.float32)).astype(np.float64)
    final = None
    if scheduler in A1111_SCHEDULES:  # a1111_schedules.py: the model's whole range, no spacing
        timesteps, sigmas, final = a1111_schedule(scheduler, steps, sigmas_train, log_sigmas, ays_table)
    elif scheduler in TRAINING_GRID_SCHEDULES:
        timesteps = training_grid_timesteps(scheduler, steps, len(sigmas_train))
        sigmas = t_to_sigma(timesteps, log_sigmas)
    else:
        timesteps = lcm_timesteps(cfg, steps) if rule in SKIPPING_STEP_RULES else spaced_timesteps(cfg, steps, rule)
        sigmas = np.interp(timesteps, np.arange(len(sigmas_train)), sigmas_train)
        if scheduler in SIGMA_RANGE_SCHEDULES:
            full = rule in FULL_RANGE_RULES
            sigma_min, sigma_max = (sigmas_train[0], sigmas_train[-1]) if full else (sigmas[-1], sigmas[0])
            sigmas = SIGMA_RANGE_FORMULAS[scheduler](float(sigma_min), float(sigma_max), steps)
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if full:  # integer UNet timesteps: diffusers rounds Karras ones and truncates the others
                timesteps = timesteps.round() if scheduler == "karras" else np.floor(timesteps)
            elif rule == "kdpm2" and scheduler == "karras":  # KDPM2*: rounded
                timesteps = timesteps.round()
        elif scheduler != "automatic":
            raise ValueError(f"unsupported scheduler {scheduler!r}")
    if final is None and rule in ("ddim", "pndm") and scheduler == "automatic":  # they end at alpha_bar[0]
        acp0 = 1.0 if cfg.set_alpha_to_one else 1.0 / (1.0 + sigmas_train[0] ** 2)  # (1 with set_alpha_to_one)
        final = np.sqrt((1.0 - acp0) / acp0)
    elif final is None and rule == "tcd":  # TCD's last step ends at timestep 0 (samplers_tcd.py)
        final = sigmas_train[0]
    elif final is None:
        final = 0.0
    sigmas = np.append(sigmas, final).astype(np.float32)
    sigma_max = float(sigmas[0])
    if rule in ("euler", "kdpm2") and not (uses_spacing(rule, scheduler) and cfg.timestep_spacing == "leading"):
        initial = sigma_max  # diffusers' init_noise_sigma; k-diffusion's too
    else:  # variance-preserving samplers start from unit noise: sqrt(1 + sigma^2) in x0 + sigma * eps units
        initial = float(np.sqrt(sigma_max**2 + 1.0))
    return Schedule(sigmas, timesteps.astype(np.float32), initial)


# Schedule types (schedules.SCHEDULES): name -> A1111 label, as the infotext's "Schedule type" writes it.
SCHEDULERS = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "beta": "Beta",
    "polyexponential": "Polyexponential",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
    "normal": "Normal",
    "ddim": "DDIM",
}
SCHEDULER_ALIASES = {"sgmuniform": "sgm_uniform"}  # A1111's; its labels ("SGM Uniform") are accepted too


def resolve_scheduler(scheduler: str) -> str:
    """The schedule name for a name or A1111 label ("karras", "Karras", "SGM Uniform"), any case."""
    by_lower = {k: k for k in SCHEDULERS} | {v.lower(): k for k, v in SCHEDULERS.items()} | SCHEDULER_ALIASES
    if not isinstance(scheduler, str) or scheduler.strip().lower() not in by_lower:
        raise InvalidOption("scheduler", scheduler, ", ".join(SCHEDULERS))
    return by_lower[scheduler.strip().lower()]


def check_schedule(config: SchedulerConfig, sampler: str, rule: str, scheduler: str, spacing, steps: int) -> None:
    """Refuse the timestep spacing, steps and schedule mixes that make no sense for SAMPLER (timestep RULE) with
    SCHEDULER on a model of scheduler CONFIG (InvalidOption naming the field)."""
    if spacing is not None and spacing not in SPACINGS:
        raise InvalidOption("timestep_spacing", spacing, "None (the model's config), " + ", ".join(SPACINGS))
    if spacing is not None and not uses_spacing(rule, scheduler):
        raise InvalidOption(
            "timestep_spacing", spacing, f"None: sampler {sampler!r} with scheduler {scheduler!r} uses no spacing"
        )
    if rule in SKIPPING_STEP_RULES and steps > config.original_inference_steps:
        raise InvalidOption(
            "steps", steps, f"1 to {config.original_inference_steps} with {sampler} (its original_inference_steps)"
        )
    if config.rescale_betas_zero_snr and uses_spacing(rule, scheduler):
        resolved = spacing or resolve_config(config, rule).timestep_spacing
        if resolved == "leading":  # Lin et al. 2023, section 3.3: sample from the last timestep
            raise InvalidOption(
                "timestep_spacing",
                resolved,
                "trailing or linspace: the model has zero terminal SNR (rescale_betas_zero_snr), "
                "and leading spacing never starts at its last timestep",
            )
