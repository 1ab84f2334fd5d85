"""Generation options: one frozen dataclass, validated once, with errors naming field, value and what is allowed."""

import math
from dataclasses import dataclass

import numpy as np

from sdrt.runtime.conditioning import EMPHASES, MAX_CLIP_SKIP
from sdrt.runtime.errors import InvalidOption
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.rng import GENERATORS
from sdrt.runtime.schedules import SPACINGS, resolve_config, uses_spacing
from sdrt.runtime.sdxl import SdxlOptions, make_sdxl_options

# A1111 sampler name -> (sampler function name in samplers.py, diffusers timestep rule in schedules.py)
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
}
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
}
# Schedule types (schedules.SCHEDULES): name -> A1111 label, as the infotext's "Schedule type" writes it.
SCHEDULERS = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "beta": "Beta",
}
SCHEDULER_ALIASES = {"sgmuniform": "sgm_uniform"}  # A1111's; its labels ("SGM Uniform") are accepted too
LEGACY_SCHEDULE_SUFFIXES = ("karras", "exponential")  # A1111 < 1.9 names such as "DPM++ 2M SDE Exponential"
RNGS = tuple(GENERATORS)  # "torch" (= "cpu"), "gpu", "nv": see rng.py
# A1111's samplers with the "uses_ensd" option: the only ones whose infotext records ENSD (and only with eta != 0).
ENSD_SAMPLERS = ("Euler a", "DPM2 a", "DPM++ 2S a", "DPM fast", "DPM adaptive")
OUTPUT_TYPES = ("pil", "latent")
MAX_STEPS = 1000
MAX_BATCH = 64
SEED_MAX = 2**32 - 1
MAX_MASK_BLUR = 64  # A1111's mask blur slider maximum
MAX_PROMPT_CHARS = 20_000  # about 70 chunks of 75 tokens: far past any real prompt, short of a memory hazard


def resolve_scheduler(scheduler: str) -> str:
    """The schedule name for a name or A1111 label ("karras", "Karras", "SGM Uniform"), any case."""
    by_lower = {k: k for k in SCHEDULERS} | {v.lower(): k for k, v in SCHEDULERS.items()} | SCHEDULER_ALIASES
    if not isinstance(scheduler, str) or scheduler.strip().lower() not in by_lower:
        raise InvalidOption("scheduler", scheduler, ", ".join(SCHEDULERS))
    return by_lower[scheduler.strip().lower()]


def resolve_sampler(name: str, scheduler: str) -> tuple[str, str]:
    """(A1111 sampler name, scheduler) from a name such as "Euler a", "k_euler" or "DPM++ 2M Karras"."""
    if not isinstance(name, str):
        raise InvalidOption("sampler", name, ", ".join(SAMPLERS))
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
    timestep_spacing: str | None = None  # None: the model's scheduler config, else the sampler class's default
    guidance_rescale: float = 0.0  # Lin et al. 2023, eq. 16's phi; 0: off
    subseed: int = 0  # A1111's variation seed of the first image, resolved (never -1)
    subseed_strength: float = 0.0  # 0: plain seeds; 1: the variation seeds' noise
    seed_resize_from_w: int = 0  # 0: off; else the size the seed was first used at (both set, or neither)
    seed_resize_from_h: int = 0
    ensd: int = 0  # A1111's eta noise seed delta: per-step noise comes from seed + ensd
    strength: float | None = None  # img2img/inpaint denoising strength in [0, 1]; None: txt2img
    mask_blur: int | None = None  # A1111's mask blur (Gaussian sigma, pixels) when a mask is given; None: no mask
    sdxl: SdxlOptions | None = None  # SDXL's own options (prompt_2, micro-conditioning, refiner); None: SD 1.x/2.x
    clip_skip: int = 1  # A1111's "Clip skip": 1 = the last layer, 2 = the penultimate (through the final layer norm)
    emphasis: str = "Original"  # A1111's emphasis mode: "Original", "No norm", "None"

    @property
    def steps_run(self) -> int:
        """Steps actually sampled: int(steps * strength) with an init image (diffusers' get_timesteps), else steps."""
        return self.steps if self.strength is None else min(int(self.steps * self.strength), self.steps)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs when cfg_scale > 1, as in diffusers (cfg 0 or 1: conditional only)."""
        return self.cfg_scale > 1.0

    @property
    def seeds(self) -> list[int]:
        """A1111: image i of the run uses seed + i, so an image is the same alone or inside a batch.

        With a variation strength every image uses seed itself, and image i the variation seed subseed + i.
        """
        step = 0 if self.subseed_strength else 1
        return [(self.seed + i * step) % (SEED_MAX + 1) for i in range(self.batch_size * self.batch_count)]

    @property
    def subseeds(self) -> list[int]:
        """A1111: image i of the run uses the variation seed subseed + i."""
        return [(self.subseed + i) % (SEED_MAX + 1) for i in range(self.batch_size * self.batch_count)]

    @property
    def seed_resize_from(self) -> tuple[int, int] | None:
        """(height, width) in pixels that the seeds' noise is made at, or None."""
        return (self.seed_resize_from_h, self.seed_resize_from_w) if self.seed_resize_from_w else None

    @property
    def records_ensd(self) -> bool:
        """A1111 writes ENSD only for its "uses_ensd" samplers with eta != 0 (its default eta for them is 1)."""
        return bool(self.ensd) and self.sampler in ENSD_SAMPLERS and self.eta != 0

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
        if len(raw[field]) > MAX_PROMPT_CHARS:
            raise InvalidOption(field, f"a text of {len(raw[field])} characters", f"at most {MAX_PROMPT_CHARS}")
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
    subseed = _int("subseed", raw.get("subseed", -1), -1, SEED_MAX)
    raw["subseed"] = int(np.random.default_rng().integers(0, SEED_MAX + 1)) if subseed == -1 else subseed
    raw["subseed_strength"] = _float("subseed_strength", raw.get("subseed_strength", 0.0), 0, 1)
    for field in ("seed_resize_from_w", "seed_resize_from_h"):
        size = raw.get(field, 0)
        integer = not isinstance(size, bool) and isinstance(size, (int, np.integer))
        off = integer and size in (0, -1)
        if not off and not (integer and manifest.min_size <= size <= manifest.max_size and size % step == 0):
            raise InvalidOption(
                field, size, f"0 or -1 (off), or a multiple of {step} from {manifest.min_size} to {manifest.max_size}"
            )
        raw[field] = 0 if off else int(size)
    if bool(raw["seed_resize_from_w"]) != bool(raw["seed_resize_from_h"]):
        field = "seed_resize_from_h" if raw["seed_resize_from_w"] else "seed_resize_from_w"
        raise InvalidOption(field, raw.get(field, 0), "a size too: seed_resize_from_w and _h are set together")
    raw["ensd"] = _int("ensd", raw.get("ensd", 0), 0, SEED_MAX)
    if raw["output_type"] not in OUTPUT_TYPES:
        raise InvalidOption("output_type", raw["output_type"], ", ".join(OUTPUT_TYPES))
    if raw.get("eta") is not None:
        raw["eta"] = _float("eta", raw["eta"], 0, 1)
    raw["s_noise"] = _float("s_noise", raw.get("s_noise", 1.0), 0, 10)
    raw["s_churn"] = _float("s_churn", raw.get("s_churn", 0.0), 0, 100)
    raw["s_tmin"] = _float("s_tmin", raw.get("s_tmin", 0.0), 0, math.inf, allow_inf=True)
    raw["s_tmax"] = _float("s_tmax", raw.get("s_tmax", math.inf), 0, math.inf, allow_inf=True)
    if raw.get("strength") is not None:
        raw["strength"] = _float("strength", raw["strength"], 0, 1)
    if raw.get("mask_blur") is not None:
        raw["mask_blur"] = _int("mask_blur", raw["mask_blur"], 0, MAX_MASK_BLUR)
    raw["clip_skip"] = _int("clip_skip", raw.get("clip_skip", 1), 1, MAX_CLIP_SKIP)
    if raw.get("emphasis", "Original") not in EMPHASES:
        raise InvalidOption("emphasis", raw["emphasis"], ", ".join(EMPHASES))
    schedule_options(manifest, raw)
    raw["sdxl"] = make_sdxl_options(manifest, raw.get("sdxl") or {})
    return GenerationOptions(**raw)


def schedule_options(manifest: Manifest, raw: dict) -> None:
    """Validate timestep_spacing and guidance_rescale in RAW; refuse sampler/schedule/model mixes that make no sense."""
    sampler, scheduler, cfg = raw["sampler"], raw["scheduler"], manifest.scheduler
    rule = SAMPLERS[sampler][1]
    spacing = raw.get("timestep_spacing")
    if spacing is not None and spacing not in SPACINGS:
        raise InvalidOption("timestep_spacing", spacing, "None (the model's config), " + ", ".join(SPACINGS))
    if spacing is not None and not uses_spacing(rule, scheduler):
        raise InvalidOption(
            "timestep_spacing", spacing, f"None: sampler {sampler!r} with scheduler {scheduler!r} uses no spacing"
        )
    raw["timestep_spacing"] = spacing
    raw["guidance_rescale"] = _float("guidance_rescale", raw.get("guidance_rescale", 0.0), 0, 1)
    if raw["guidance_rescale"] and raw["cfg_scale"] <= 1:
        raise InvalidOption(
            "guidance_rescale", raw["guidance_rescale"], "0 when cfg_scale <= 1 (no guidance runs to rescale)"
        )
    if rule == "lcm" and raw["steps"] > cfg.original_inference_steps:
        raise InvalidOption(
            "steps", raw["steps"], f"1 to {cfg.original_inference_steps} with LCM (its original_inference_steps)"
        )
    if cfg.rescale_betas_zero_snr and uses_spacing(rule, scheduler):
        resolved = spacing or resolve_config(cfg, rule).timestep_spacing
        if resolved == "leading":  # Lin et al. 2023, section 3.3: sample from the last timestep
            raise InvalidOption(
                "timestep_spacing",
                resolved,
                "trailing or linspace: the model has zero terminal SNR (rescale_betas_zero_snr), "
                "and leading spacing never starts at its last timestep",
            )
