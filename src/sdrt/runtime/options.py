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

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs when cfg_scale > 1, as in diffusers (cfg 0 or 1: conditional only)."""
        return self.cfg_scale > 1.0

    @property
    def seeds(self) -> list[int]:
        """A1111: image i of the run uses seed + i, so an image is the same alone or inside a batch."""
        return [(self.seed + i) % (SEED_MAX + 1) for i in range(self.batch_size * self.batch_count)]


def _int(field: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise InvalidOption(field, value, f"an integer from {low} to {high}")
    return int(value)


def make_options(
    manifest: Manifest,
    prompt,
    negative_prompt,
    width,
    height,
    steps,
    cfg_scale,
    sampler,
    scheduler,
    seed,
    batch_size,
    batch_count,
    rng,
    output_type,
) -> GenerationOptions:
    """Validate every option against the model's manifest; the first bad one raises InvalidOption."""
    for field, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(text, str):
            raise InvalidOption(field, text, "a string")
    step = manifest.latent_downsample
    width = manifest.native_size if width is None else width
    height = manifest.native_size if height is None else height
    for field, size in (("width", width), ("height", height)):
        _int(field, size, manifest.min_size, manifest.max_size)
        if size % step:
            raise InvalidOption(field, size, f"a multiple of {step} from {manifest.min_size} to {manifest.max_size}")
    steps = _int("steps", steps, 1, MAX_STEPS)
    if (
        isinstance(cfg_scale, bool)
        or not isinstance(cfg_scale, (int, float, np.floating))
        or not math.isfinite(cfg_scale)
        or not 0 <= cfg_scale <= 100
    ):
        raise InvalidOption("cfg_scale", cfg_scale, "a finite number from 0 to 100")
    sampler, scheduler = resolve_sampler(sampler, scheduler)
    seed = _int("seed", seed, -1, SEED_MAX)
    if seed == -1:
        seed = int(np.random.default_rng().integers(0, SEED_MAX + 1))
    batch_size = _int("batch_size", batch_size, 1, MAX_BATCH)
    batch_count = _int("batch_count", batch_count, 1, 10_000)
    if rng not in RNGS:
        raise InvalidOption("rng", rng, ", ".join(RNGS))
    if output_type not in OUTPUT_TYPES:
        raise InvalidOption("output_type", output_type, ", ".join(OUTPUT_TYPES))
    return GenerationOptions(
        prompt,
        negative_prompt,
        int(width),
        int(height),
        steps,
        float(cfg_scale),
        sampler,
        scheduler,
        seed,
        batch_size,
        batch_count,
        rng,
        output_type,
    )
