"""The flow families' own generation options: FLUX.1's distilled guidance and SD 3.5's skip-layer guidance.

Their specs (SPECS) become GenerationOptions fields of the groups "flux" and "sd3" (options.py); their values are
validated here into the family's option object (GenerationOptions.family_options, set by families/flow.py).

  distilled_cfg_scale       Forge's "Distilled CFG Scale": FLUX.1 dev's guidance input (diffusers' guidance_scale)
  skip_guidance_layers      diffusers' StableDiffusion3Pipeline skip-layer guidance (SLG; ComfyUI's
  skip_layer_guidance_*     SkipLayerGuidanceSD3 node: layers, scale, start_percent, end_percent): an extra
                            transformer call with those blocks skipped, pushed away from (scale, start, stop)
"""

import math
from dataclasses import dataclass

from sdrt.errors import InvalidOption, is_int, is_number
from sdrt.runtime.option_mappings import infotext_number

DISTILLED_CFG_SCALE = 3.5  # FluxPipeline's guidance_scale default, Forge's Distilled CFG Scale default
MAX_GUIDANCE = 100.0
# StableDiffusion3Pipeline's defaults; SD 3.5 Medium's model card and diffusers' docs use layers 7, 8, 9
SLG_SCALE, SLG_START, SLG_STOP = 2.8, 0.01, 0.2
FLUX_OPTIONS = ("distilled_cfg_scale",)
SLG_OPTIONS = ("skip_guidance_layers", "skip_layer_guidance_scale", "skip_layer_guidance_start",
               "skip_layer_guidance_stop")  # fmt: skip


def family_value(opts, name: str):
    """Option NAME of OPTS' resolved family options, or None (another family, or not set)."""
    return getattr(opts.family_options, name, None)


def _slg_value(name: str):
    """The infotext writer of an SLG number: written only while skip-layer guidance runs."""
    return lambda o, im: infotext_number(family_value(o, name)) if family_value(o, "skip_guidance_layers") else None


def read_layers(text: str) -> tuple[int, ...]:
    """'7,8,9' (the infotext's and the command line's form) -> (7, 8, 9)."""
    try:
        return tuple(int(part) for part in str(text).replace(" ", ",").split(",") if part)
    except ValueError:
        raise InvalidOption("skip_guidance_layers", text, "block indices such as 7,8,9") from None


def write_layers(o, im):
    layers = family_value(o, "skip_guidance_layers")
    return ",".join(str(i) for i in layers) if layers else None


# field name -> (default, kind, Spec keywords), in the order the fields appear in GenerationOptions
SPECS = {
    "distilled_cfg_scale": (None, "float", dict(
        group="flux", a1111="distilled_cfg_scale", infotext="Distilled CFG Scale",
        write=lambda o, im: infotext_number(family_value(o, "distilled_cfg_scale")),
        help=f"FLUX.1 dev's distilled guidance, Forge's 'Distilled CFG Scale' (default {DISTILLED_CFG_SCALE})",
    )),
    "skip_guidance_layers": (None, "ints", dict(
        group="sd3", a1111="skip_guidance_layers", infotext="SLG layers", write=write_layers, read=read_layers,
        help="SD 3.5 skip-layer guidance: the transformer blocks skipped (SD 3.5 Medium: 7 8 9); none: off",
    )),
    "skip_layer_guidance_scale": (None, "float", dict(
        group="sd3", a1111="skip_layer_guidance_scale", infotext="SLG scale", write=_slg_value("scale"),
        help=f"its scale (default {SLG_SCALE})",
    )),
    "skip_layer_guidance_start": (None, "float", dict(
        group="sd3", a1111="skip_layer_guidance_start", infotext="SLG start", write=_slg_value("start"),
        help=f"the fraction of the steps after which it starts (default {SLG_START})",
    )),
    "skip_layer_guidance_stop": (None, "float", dict(
        group="sd3", a1111="skip_layer_guidance_stop", infotext="SLG stop", write=_slg_value("stop"),
        help=f"the fraction of the steps before which it stops (default {SLG_STOP})",
    )),
}  # fmt: skip


@dataclass(frozen=True)
class FluxOptions:
    """FLUX.1's own options, resolved: the distilled guidance fed to dev's transformer (None: schnell, no input)."""

    distilled_cfg_scale: float | None = None


@dataclass(frozen=True)
class SlgOptions:
    """SD 3.5's skip-layer guidance, resolved; no layers: off."""

    skip_guidance_layers: tuple[int, ...] = ()
    scale: float = SLG_SCALE
    start: float = SLG_START
    stop: float = SLG_STOP

    def active(self, step: int, steps: int) -> bool:
        """Whether step STEP (0-based) of STEPS runs the skip-layer call: strictly between steps x start and steps x
        stop, as StableDiffusion3Pipeline tests it."""
        return bool(self.skip_guidance_layers) and steps * self.start < step < steps * self.stop


def _number(field: str, value, low: float, high: float) -> float:
    if not is_number(value) or math.isnan(value) or not low <= value <= high:
        raise InvalidOption(field, value, f"a number from {low:g} to {high:g}")
    return float(value)


def make_flux_options(given: dict, guidance_input: bool, title: str) -> FluxOptions:
    """FluxOptions from GIVEN (the flux options set); GUIDANCE_INPUT: the transformer takes the distilled guidance
    (dev), else a distilled_cfg_scale is refused (schnell)."""
    value = given.get("distilled_cfg_scale")
    if not guidance_input:
        if value is not None:
            raise InvalidOption("distilled_cfg_scale", value, f"None: this {title} model (schnell) takes no guidance "
                                "input; cfg_scale > 1 with a negative prompt runs true CFG")  # fmt: skip
        return FluxOptions()
    return FluxOptions(DISTILLED_CFG_SCALE if value is None else _number("distilled_cfg_scale", value, 0, MAX_GUIDANCE))


def make_slg_options(given: dict, blocks: int | None) -> SlgOptions:
    """SlgOptions from GIVEN (the sd3 options set) for a transformer graph with BLOCKS block gates (None: exported
    without them, by an older sdrt: skip-layer guidance is refused)."""
    raw = given.get("skip_guidance_layers")
    if raw is None or raw == () or raw == []:
        others = [name for name in SLG_OPTIONS[1:] if name in given]
        if others:
            raise InvalidOption(others[0], given[others[0]], "None without skip_guidance_layers (SLG is off)")
        return SlgOptions()
    if blocks is None:
        raise InvalidOption("skip_guidance_layers", raw, "None: this export's transformer cannot skip blocks (no "
                            "block_gates input); re-export it with this sdrt for skip-layer guidance")  # fmt: skip
    chosen = read_layers(raw) if isinstance(raw, str) else raw
    if not isinstance(chosen, (tuple, list)) or not chosen or not all(is_int(i) and 0 <= i < blocks for i in chosen):
        raise InvalidOption("skip_guidance_layers", raw, f"block indices from 0 to {blocks - 1}, e.g. 7,8,9")
    scale = _number("skip_layer_guidance_scale", given.get("skip_layer_guidance_scale", SLG_SCALE), 0, MAX_GUIDANCE)
    start = _number("skip_layer_guidance_start", given.get("skip_layer_guidance_start", SLG_START), 0, 1)
    stop = _number("skip_layer_guidance_stop", given.get("skip_layer_guidance_stop", SLG_STOP), 0, 1)
    if stop < start:
        raise InvalidOption("skip_layer_guidance_stop", stop, f"at least skip_layer_guidance_start ({start:g})")
    return SlgOptions(tuple(sorted({int(i) for i in chosen})), scale, start, stop)
