"""ControlNet units as text: the CLI's key=value fields and the extension's infotext entries ("ControlNet 0: Module:
canny, Model: ..., Weight: 1, ...")."""

from sdrt.errors import InvalidOption

# ControlNetUnit's settable fields as text (CLI key=value pairs, infotext entries): name -> converter.
UNIT_TEXT_FIELDS = {
    "module": str,
    "model": str,
    "weight": float,
    "guidance_start": float,
    "guidance_end": float,
    "control_mode": str,
    "resize_mode": str,
    "processor_res": int,
    "threshold_a": float,
    "threshold_b": float,
    "pixel_perfect": lambda v: {"true": True, "false": False}[v.strip().lower()],
}
# The extension's infotext keys (its `scripts/infotext.py`, fields in title case) -> unit fields.
INFOTEXT_KEYS = {
    "Module": "module",
    "Model": "model",
    "Weight": "weight",
    "Resize Mode": "resize_mode",
    "Processor Res": "processor_res",
    "Threshold A": "threshold_a",
    "Threshold B": "threshold_b",
    "Guidance Start": "guidance_start",
    "Guidance End": "guidance_end",
    "Pixel Perfect": "pixel_perfect",
    "Control Mode": "control_mode",
}


def unit_fields(text: dict[str, str], where: str) -> dict:
    """{unit field: typed value} from {unit field: text}; InvalidOption naming `where.field` for an unknown field or a
    value that does not convert."""
    out = {}
    for name, value in text.items():
        if name not in UNIT_TEXT_FIELDS:
            raise InvalidOption(f"{where}", name, "a ControlNet unit field: " + ", ".join(UNIT_TEXT_FIELDS))
        try:
            out[name] = UNIT_TEXT_FIELDS[name](value)
        except (ValueError, KeyError):
            kind = {float: "a number", int: "an integer", str: "text"}.get(UNIT_TEXT_FIELDS[name], "true or false")
            raise InvalidOption(f"{where}.{name}", value, kind) from None
    return out


def infotext_units(params: dict) -> list[dict]:
    """The units an infotext records (parse_infotext's dict: "ControlNet 0": "Module: canny, Model: ..., ..."), as
    ControlNetUnit keyword arguments without the image, in unit order."""
    units = []
    keys = sorted((int(k.split()[-1]), k) for k in params if k.startswith("ControlNet ") and k.split()[-1].isdigit())
    for _, key in keys:
        text = {}
        for pair in str(params[key]).split(", "):
            label, _, value = pair.partition(": ")
            if label.strip() in INFOTEXT_KEYS:
                text[INFOTEXT_KEYS[label.strip()]] = value.strip()
        units.append(unit_fields(text, key))
    return units
