"""Generation options: one frozen dataclass, validated once, with errors naming field, value and what is allowed."""

import math
from dataclasses import dataclass

import numpy as np

from sdrt.runtime.errors import InvalidOption
from sdrt.runtime.manifest import Manifest

# A1111 sampler name -> (sampler function name in samplers.py, diffusers timestep rule in schedules.py)
SAMPLERS = {
    "Euler": ("sample_euler", "euler"),
    "Euler a": ("sample_euler_ancestral", "euler"),
    "DDIM": ("sample_ddim", "ddim"),
    "DPM++ 2M": ("sample_dpmpp_2m", "dpmsolver"),
}
# A1111's aliases (sd_samplers_kdiffusion.py) and its pre-1.9 names that carried the schedule.
SAMPLER_ALIASES = {
    "k_euler": "Euler",
    "k_euler_a": "Euler a",
    "k_euler_ancestral": "Euler a",
    "k_dpmpp_2m": "DPM++ 2M",
    "ddim": "DDIM",
}
SCHEDULERS = {"automatic": "Automatic", "karras": "Karras"}  # name -> A1111 label ("Schedule type")
RNGS = ("torch",)
OUTPUT_TYPES = ("pil", "latent")
MAX_STEPS = 1000
MAX_BATCH = 64
SEED_MAX = 2**32 - 1


def resolve_sampler(name: str, scheduler: str) -> tuple[str, str]:
    """(A1111 sampler name, scheduler) from a name such as "Euler a", "k_euler" or "DPM++ 2M Karras"."""
    if not isinstance(name, str):
        raise InvalidOption("sampler", name, ", ".join(SAMPLERS))
    if not isinstance(scheduler, str) or scheduler.lower() not in SCHEDULERS:
        raise InvalidOption("scheduler", scheduler, ", ".join(SCHEDULERS))
    scheduler = scheduler.lower()
    by_lower = {k.lower(): k for k in SAMPLERS} | SAMPLER_ALIASES
    key = name.strip().lower()
    if key.endswith(" karras") and key[: -len(" karras")] in by_lower:
        if scheduler not in ("automatic", "karras"):
            raise InvalidOption("scheduler", scheduler, f"automatic or karras with the sampler {name!r}")
        return by_lower[key[: -len(" karras")]], "karras"
    if key not in by_lower:
        raise InvalidOption("sampler", name, ", ".join(SAMPLERS) + " (and legacy names such as 'DPM++ 2M Karras')")
    return by_lower[key], scheduler


@dataclass(frozen=True)
class GenerationOptions:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    sampler: str  # A1111 name, resolved
    scheduler: str  # "automatic" | "karras"
    seed: int  # the first image's seed, resolved (never -1)
    batch_size: int
    batch_count: int
    rng: str
    output_type: str
    eta: float | None = None  # None: the sampler's default (DDIM 0, ancestral samplers 1)
    s_noise: float = 1.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs when cfg_scale > 1, as in diffusers (cfg 0 or 1: conditional only)."""
        return self.cfg_scale > 1.0

    @property
    def seeds(self) -> list[int]:
        """A1111: image i of the run uses seed + i, so an image is the same alone or inside a batch."""
        return [(self.seed + i) % (SEED_MAX + 1) for i in range(self.batch_size * self.batch_count)]

    def sampler_kwargs(self) -> dict:
        """The sampler knobs the user set (eta, s_noise, s_churn, s_tmin, s_tmax); unset eta is left out."""
        knobs = {"s_noise": self.s_noise, "s_churn": self.s_churn, "s_tmin": self.s_tmin, "s_tmax": self.s_tmax}
        return knobs if self.eta is None else {**knobs, "eta": self.eta}


def _int(field: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise InvalidOption(field, value, f"an integer from {low} to {high}")
    return int(value)


def _float(field: str, value, low: float, high: float, allow_inf: bool = False) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or math.isnan(value) or (math.isinf(value) and not allow_inf) or not low <= value <= high:
        raise InvalidOption(field, value, f"a {'' if allow_inf else 'finite '}number from {low} to {high}")
    return float(value)


def make_options(manifest: Manifest, **raw) -> GenerationOptions:
    """Validate every option against the model's manifest; the first bad one raises InvalidOption."""
    for field in ("prompt", "negative_prompt"):
        if not isinstance(raw[field], str):
            raise InvalidOption(field, raw[field], "a string")
    step = manifest.latent_downsample
    for field in ("width", "height"):
        size = manifest.native_size if raw[field] is None else raw[field]
        _int(field, size, manifest.min_size, manifest.max_size)
        if size % step:
            raise InvalidOption(field, size, f"a multiple of {step} from {manifest.min_size} to {manifest.max_size}")
        raw[field] = int(size)
    raw["steps"] = _int("steps", raw["steps"], 1, MAX_STEPS)
    raw["cfg_scale"] = _float("cfg_scale", raw["cfg_scale"], 0, 100)
    raw["sampler"], raw["scheduler"] = resolve_sampler(raw["sampler"], raw["scheduler"])
    seed = _int("seed", raw["seed"], -1, SEED_MAX)
    raw["seed"] = int(np.random.default_rng().integers(0, SEED_MAX + 1)) if seed == -1 else seed
    raw["batch_size"] = _int("batch_size", raw["batch_size"], 1, MAX_BATCH)
    raw["batch_count"] = _int("batch_count", raw["batch_count"], 1, 10_000)
    if raw["rng"] not in RNGS:
        raise InvalidOption("rng", raw["rng"], ", ".join(RNGS))
    if raw["output_type"] not in OUTPUT_TYPES:
        raise InvalidOption("output_type", raw["output_type"], ", ".join(OUTPUT_TYPES))
    if raw.get("eta") is not None:
        raw["eta"] = _float("eta", raw["eta"], 0, 1)
    raw["s_noise"] = _float("s_noise", raw.get("s_noise", 1.0), 0, 10)
    raw["s_churn"] = _float("s_churn", raw.get("s_churn", 0.0), 0, 100)
    raw["s_tmin"] = _float("s_tmin", raw.get("s_tmin", 0.0), 0, math.inf, allow_inf=True)
    raw["s_tmax"] = _float("s_tmax", raw.get("s_tmax", math.inf), 0, math.inf, allow_inf=True)
    return GenerationOptions(**raw)
