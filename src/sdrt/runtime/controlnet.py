"""ControlNet at run time (Zhang et al. 2023): units as A1111's ControlNet extension takes them, control maps, and the
residuals each denoiser call adds to the UNet (the model's `unet_controlnet` graph).

How a unit acts, as the extension does it (`scripts/hook.py`, `scripts/controlnet.py`) and diffusers' ControlNet
pipelines:
- The ControlNet sees the UNet's scaled input x / sqrt(sigma^2 + 1) (4 channels, also for inpainting UNets), the
  timestep, the text embeddings (SDXL: pooled + time ids) and the control map in [0, 1]. Its residuals, times the
  unit's scales, are summed over units and added to the UNet's skip connections and mid block.
- Control mode "Balanced": every residual times `weight`, for both guidance halves (diffusers' default).
  "My prompt is more important": soft injection, residual i of n times weight * 10 ** (-(n - 1 - i) / (n - 1)),
  from 0.1 to 1 at the mid block (diffusers' guess-mode scales; for SD 1.x's 13 residuals that is 0.8254 ** (12 - i),
  within 0.6% of the extension's 0.825 ** (12 - i)), on both halves.
  "ControlNet is more important": the same soft scales, on the conditional half only (the extension's
  cfg_injection, diffusers' guess_mode).
  ControlNets with global_pool_conditions (shuffle) give spatial means, on the conditional half only.
- Guidance start/end: step i of the n steps run uses the unit when not (i / n < start or (i + 1) / n > end)
  (diffusers' controlnet_keep). The extension's rule (i / n within [start, end]) runs one step more at the end.
"""

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from sdrt.errors import InvalidOption, ModelError
from sdrt.runtime.control_maps import MAX_PROCESSOR_RES, MIN_PROCESSOR_RES, control_map
from sdrt.runtime.control_preprocess import MODULE_ALIASES, PREPROCESSORS
from sdrt.runtime.controlnet_models import ControlNetCache, ControlNetInfo

UNET_CONTROLNET = "unet_controlnet"
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")  # the extension's labels, its order
# Older names the extension's API still accepts.
RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Envelope (Outer Fit)": "Resize and Fill"}
SOFT_INJECTION_RANGE = 0.1  # soft injection scales residuals from 0.1 (the first) to 1 (the mid block's)
MAX_WEIGHT = 2.0  # the extension's "Control Weight" slider: 0 to 2
DEFAULT_PROCESSOR_RES = 512  # the extension's "Preprocessor Resolution"


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet of a generation, with the A1111 extension's field names and defaults.

    `model`: an exported ControlNet folder (`sdrt export-controlnet`), or its name/title in the pipeline's
    `controlnet_dir`. `image`: a PIL image, a path or an (H, W, 3) uint8 array; the preprocessor `module` turns it
    into the control map (`none`: the image is the map). `weight` 0 to 2; `guidance_start`/`guidance_end` fractions
    of the steps run; `control_mode` and `resize_mode` as the extension's labels (or their indices 0, 1, 2);
    `processor_res` the preprocessor's resolution (short side, pixels); `threshold_a`/`threshold_b` the module's
    parameters (None: its defaults; canny: low 100, high 200); `pixel_perfect` picks processor_res from the
    generation size."""

    model: object
    image: object = None
    module: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "Balanced"
    resize_mode: str = "Crop and Resize"
    processor_res: int = DEFAULT_PROCESSOR_RES
    threshold_a: float | None = None
    threshold_b: float | None = None
    pixel_perfect: bool = False
    enabled: bool = True


def _number(field: str, value, low: float, high: float) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or math.isnan(value) or not low <= value <= high:
        raise InvalidOption(field, value, f"a number from {low:g} to {high:g}")
    return float(value)


def _label(field: str, value, labels: tuple[str, ...], aliases: dict | None = None) -> str:
    """A label by name (case-insensitive, aliases too) or by index, as the extension's API accepts both."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(labels):
        return labels[int(value)]
    if isinstance(value, str):
        for label in (*labels, *(aliases or {})):
            if value.strip().lower() == label.lower():
                return (aliases or {}).get(label, label)
    allowed = ", ".join(f"{i} or {label!r}" for i, label in enumerate(labels))
    raise InvalidOption(field, value, allowed)


def module_name(value, field: str = "module") -> str:
    """The extension's module name for VALUE (aliases accepted), or InvalidOption listing the modules."""
    if isinstance(value, str):
        name = MODULE_ALIASES.get(value.strip().lower(), value.strip().lower())
        if name in PREPROCESSORS:
            return name
    raise InvalidOption(
        field, value, "one of " + ", ".join(PREPROCESSORS) + " (aliases: " + ", ".join(MODULE_ALIASES) + ")"
    )


def check_unit(unit, index: int) -> ControlNetUnit:
    """UNIT with every field validated (errors name `controlnets[INDEX].field`), labels normalised and the module's
    threshold defaults filled in."""
    where = f"controlnets[{index}]"
    if not isinstance(unit, ControlNetUnit):
        raise InvalidOption(where, type(unit).__name__, "a ControlNetUnit")
    module = module_name(unit.module, f"{where}.module")
    pre = PREPROCESSORS[module]
    start = _number(f"{where}.guidance_start", unit.guidance_start, 0, 1)
    end = _number(f"{where}.guidance_end", unit.guidance_end, 0, 1)
    if end < start:
        raise InvalidOption(
            f"{where}.guidance_end", unit.guidance_end, f"a number from guidance_start ({start:g}) to 1"
        )
    thresholds = {}
    for name, spec in (("threshold_a", pre.threshold_a), ("threshold_b", pre.threshold_b)):
        value = getattr(unit, name)
        if spec is None or value is None or (isinstance(value, (int, float)) and value == -1):
            thresholds[name] = None if spec is None else float(spec[0])  # -1: the API's "module default"
        else:
            thresholds[name] = _number(f"{where}.{name}", value, spec[1], spec[2])
    res = unit.processor_res
    if isinstance(res, (int, float)) and not isinstance(res, bool) and res == -1:
        res = DEFAULT_PROCESSOR_RES
    if (
        isinstance(res, bool)
        or not isinstance(res, (int, np.integer))
        or not MIN_PROCESSOR_RES <= res <= MAX_PROCESSOR_RES
    ):
        raise InvalidOption(
            f"{where}.processor_res", res, f"an integer from {MIN_PROCESSOR_RES} to {MAX_PROCESSOR_RES}"
        )
    for name in ("pixel_perfect", "enabled"):
        if not isinstance(getattr(unit, name), bool):
            raise InvalidOption(f"{where}.{name}", getattr(unit, name), "True or False")
    if unit.image is None:
        raise InvalidOption(f"{where}.image", None, "a control image (PIL image, path or (H, W, 3) uint8 array)")
    return replace(
        unit,
        module=module,
        weight=_number(f"{where}.weight", unit.weight, 0, MAX_WEIGHT),
        guidance_start=start,
        guidance_end=end,
        control_mode=_label(f"{where}.control_mode", unit.control_mode, CONTROL_MODES),
        resize_mode=_label(f"{where}.resize_mode", unit.resize_mode, RESIZE_MODES, RESIZE_ALIASES),
        processor_res=int(res),
        **thresholds,
    )


@dataclass
class PreparedUnit:
    unit: ControlNetUnit
    info: ControlNetInfo
    engine: object
    cond: np.ndarray  # (1, 3, H, W) float32 in [0, 1]
    scales: np.ndarray  # (n,) float32: each residual's factor
    cond_only: bool  # residuals on the conditional half only (cfg injection, global pooling)


@dataclass
class ControlSet:
    """The ControlNets of one generation, ready to run: `hook(sigmas, batch)` gives a denoiser's ControlHook."""

    units: list[PreparedUnit]
    unet: object  # the model's unet_controlnet engine
    maps: list[Image.Image] = field(default_factory=list)  # the control maps, in unit order

    def hook(self, sigmas: np.ndarray) -> "ControlHook":
        return ControlHook(self, np.asarray(sigmas, np.float64))

    def infotext(self) -> dict:
        """The extension's infotext entries: "ControlNet i": "Module: canny, Model: name [hash], Weight: 1, ..."."""
        from sdrt.runtime.image import format_number

        entries = {}
        for i, p in enumerate(self.units):
            u = p.unit
            fields = {
                "Module": u.module,
                "Model": p.info.title,
                "Weight": format_number(u.weight),
                "Resize Mode": u.resize_mode,
                "Processor Res": u.processor_res,
                "Threshold A": format_number(u.threshold_a) if u.threshold_a is not None else None,
                "Threshold B": format_number(u.threshold_b) if u.threshold_b is not None else None,
                "Guidance Start": format_number(u.guidance_start),
                "Guidance End": format_number(u.guidance_end),
                "Pixel Perfect": u.pixel_perfect,
                "Control Mode": u.control_mode,
            }
            entries[f"ControlNet {i}"] = ", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None)
        return entries


def unit_scales(unit: ControlNetUnit, n: int) -> np.ndarray:
    """(n,) float32 factors of a unit's n residuals (down..., mid): weight, or the soft-injection weights."""
    if unit.control_mode == "Balanced":
        return np.full(n, unit.weight, np.float32)
    return (unit.weight * np.logspace(np.log10(SOFT_INJECTION_RANGE), 0, n)).astype(np.float32)


def check_units(units) -> tuple[ControlNetUnit, ...]:
    """The generation option `controlnets` (None or a list of units), every unit checked (check_unit)."""
    if units is None:
        return ()
    if not isinstance(units, (list, tuple)):
        raise InvalidOption("controlnets", type(units).__name__, "a list of ControlNetUnit")
    return tuple(check_unit(u, i) for i, u in enumerate(units))


def load_units(manifest, cache: ControlNetCache, units) -> list[tuple[int, ControlNetUnit, ControlNetInfo, object]]:
    """UNITS validated against MANIFEST's model, with their ControlNets from CACHE (manifest, engine): (index, unit,
    info, engine) of each enabled unit. Errors name `controlnets[i].field`."""
    enabled = [(i, u) for i, u in enumerate(check_units(units)) if u.enabled]
    if enabled and UNET_CONTROLNET not in manifest.models:
        raise ModelError(
            f"{manifest.folder} has no {UNET_CONTROLNET} graph (the UNet that takes ControlNet residuals): add it with "
            f"`sdrt export SOURCE -o {manifest.folder} --controlnet` (SOURCE: the checkpoint it was exported from)"
        )
    loaded = []
    for i, unit in enabled:
        where = f"controlnets[{i}]"
        info, engine = cache.get(unit.model, where)
        inputs = manifest.models[UNET_CONTROLNET]["inputs"]
        channels = {t["name"]: t["shape"][1] for t in inputs if len(t["shape"]) == 4}
        fits = all(channels.get(name) == c for name, c in info.residuals)
        if info.family != manifest.family or not fits:
            raise InvalidOption(
                f"{where}.model", info.title,
                f"a ControlNet for {manifest.family} models (this one is for {info.family}"
                + ("" if fits else ": its residuals do not fit this UNet") + ")",
            )  # fmt: skip
        loaded.append((i, unit, info, engine))
    return loaded


def prepare_controls(manifest, engines: dict, cache: ControlNetCache, units, width: int, height: int):
    """Validate UNITS against MANIFEST's model, load their ControlNets (CACHE) and make their control maps: a
    ControlSet over the model's ENGINES, or None if no unit is enabled."""
    loaded = load_units(manifest, cache, units)
    if not loaded:
        return None
    prepared, maps = [], []
    for i, unit, info, engine in loaded:
        mapped = control_map(unit, width, height, f"controlnets[{i}]")
        maps.append(Image.fromarray(mapped))
        cond = (mapped.astype(np.float32) / 255).transpose(2, 0, 1)[None]  # (1, 3, H, W) in [0, 1]
        cond_only = unit.control_mode == "ControlNet is more important" or info.global_pool_conditions
        prepared.append(PreparedUnit(unit, info, engine, cond, unit_scales(unit, len(info.residuals)), cond_only))
    return ControlSet(prepared, engines[UNET_CONTROLNET], maps)


class ControlHook:
    """The residual feeds of one denoiser call: each active unit's ControlNet run on the call's inputs, scaled and
    summed (None when no unit is active at this step: the plain UNet runs)."""

    def __init__(self, controls: ControlSet, sigmas: np.ndarray):
        self.controls = controls
        self.sigmas = sigmas[:-1]  # (n,) the steps' starting sigmas, decreasing

    @property
    def unet(self):
        return self.controls.unet

    def step_index(self, sigma: float) -> int:
        """The step whose interval holds SIGMA (intermediate sigmas of second-order samplers included)."""
        i = int(np.sum(self.sigmas >= np.float64(sigma) * (1 - 1e-6))) - 1
        return min(max(i, 0), len(self.sigmas) - 1)

    def active(self, unit: ControlNetUnit, i: int) -> bool:
        n = len(self.sigmas)
        return not (i / n < unit.guidance_start or (i + 1) / n > unit.guidance_end)

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, text: dict, sigma: float, guided: bool):
        """sample (2B or B, C, h, w) scaled latents (uncond half first), timestep (2B or B,), text: the UNet's text
        feeds -> {residual name: (2B or B, c, h', w') float32} or None."""
        i = self.step_index(sigma)
        total = None
        for p in self.controls.units:
            if not self.active(p.unit, i) or p.unit.weight == 0:
                continue
            half = guided and p.cond_only
            rows = slice(len(sample) // 2, None) if half else slice(None)
            feeds = {"sample": sample[rows], "timestep": timestep[rows]}
            for name in p.info.inputs:
                if name in text:
                    feeds[name] = text[name][rows]
            feeds["controlnet_cond"] = np.repeat(p.cond, len(feeds["sample"]), axis=0)
            out = p.engine.run(feeds)
            for k, (name, _) in enumerate(p.info.residuals):
                r = out[name] * p.scales[k]  # global_pool_conditions: (rows, c, 1, 1) means, the UNet broadcasts
                if half:  # the unconditional half gets no control
                    r = np.concatenate([np.zeros_like(r), r])
                total = total or {}
                total[name] = r if name not in total else total[name] + r
        if total is None:
            return None
        return {name: np.ascontiguousarray(r, dtype=np.float32) for name, r in total.items()}
