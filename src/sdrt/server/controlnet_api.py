"""The A1111 ControlNet extension's HTTP API over sdrt (the extension's `scripts/api.py` and `external_code.py`):
units in `alwayson_scripts: {"controlnet": {"args": [unit, ...]}}` of txt2img/img2img requests, with the extension's
field names and defaults, and GET /controlnet/model_list, /controlnet/module_list, /controlnet/version.

Models are looked up by name or "name [hash]" title among the exported ControlNets in `sdrt serve --controlnet-dir`.
A unit without an image uses the img2img init image (the extension does the same). Detected maps are appended to
the response's images when a unit asks for them (`save_detected_map`, default true), as the extension does.
"""

from sdrt.errors import InvalidOption
from sdrt.runtime.control_preprocess import PREPROCESSORS
from sdrt.runtime.controlnet import ControlNetUnit, load_units
from sdrt.server.codec import UndecodableImage

SCRIPT = "controlnet"
API_VERSION = 2  # GET /controlnet/version: the extension's API version number (clients check it is present)
# The extension's API unit fields and defaults (external_code.ControlNetUnit; -1: the module's own default).
UNIT_DEFAULTS = {
    "enabled": True,
    "module": "none",
    "model": "None",
    "weight": 1.0,
    "image": None,
    "resize_mode": "Crop and Resize",
    "low_vram": False,
    "processor_res": -1,
    "threshold_a": -1,
    "threshold_b": -1,
    "guidance_start": 0.0,
    "guidance_end": 1.0,
    "pixel_perfect": False,
    "control_mode": "Balanced",
    "save_detected_map": True,
}
# Fields of features sdrt does not have: accepted only at these values.
UNSUPPORTED = {"mask": None, "mask_image": None, "effective_region_mask": None, "ipadapter_input": None}


def prefix(index: int) -> str:
    return f"alwayson_scripts.{SCRIPT}.args[{index}]"


def take_units(req) -> list | None:
    """Remove the controlnet entry from REQ.alwayson_scripts (the other scripts stay for check_supported to refuse)
    and return its raw unit dicts (None when absent)."""
    scripts = dict(req.alwayson_scripts or {})
    key = next((k for k in scripts if k.lower() == SCRIPT), None)
    if key is None:
        return None
    entry = scripts.pop(key)
    req.alwayson_scripts = scripts
    if not isinstance(entry, dict) or not isinstance(entry.get("args", []), list):
        raise InvalidOption(f"alwayson_scripts.{SCRIPT}", entry, '{"args": [unit, ...]}')
    return entry.get("args", [])


def controlnet_cache(server):
    """The ControlNets units are looked up and validated in: the one Pipeline's, or with a models folder the
    backend's (the same --controlnet-dir every loaded Pipeline gets); None over Ray."""
    if server.pipe is not None:
        return server.pipe.controlnets
    return getattr(server.backend, "controlnets", None)


def add_units(raw, kwargs: dict, server, manifest) -> None:
    """The units of RAW (take_units) as Pipeline.generate's controlnets and control_maps in KWARGS, validated now
    against MANIFEST, the request's model (errors name the request field), so a bad unit is answered before the job
    queues."""
    if not raw:
        return
    cache = controlnet_cache(server)
    if cache is None:
        raise InvalidOption(f"alwayson_scripts.{SCRIPT}", "ControlNet units",
                            "none over --ray: ControlNet runs in sdrt serve (-m MODEL or --models-dir)")  # fmt: skip
    units, save_maps = [], False
    for i, item in enumerate(raw):
        unit, save = parse_unit(i, item, server, kwargs.get("init_image"))
        units.append(unit)
        save_maps |= save and unit.enabled
    try:
        load_units(manifest, cache, units)  # engines created, not loaded: the job's Pipeline loads its own
    except InvalidOption as e:
        raise InvalidOption(e.field.replace("controlnets[", f"alwayson_scripts.{SCRIPT}.args[", 1), e.value,
                            e.allowed) from None  # fmt: skip
    kwargs["controlnets"] = units
    kwargs["control_maps"] = save_maps


def parse_unit(index: int, item, server, init_image) -> tuple[ControlNetUnit, bool]:
    """(ControlNetUnit, save_detected_map) of one API unit dict."""
    where = prefix(index)
    if not isinstance(item, dict):
        raise InvalidOption(where, item, "a unit object with the ControlNet extension's fields")
    fields = {**UNIT_DEFAULTS, **{k: v for k, v in item.items() if k in UNIT_DEFAULTS}}
    for name, accepted in UNSUPPORTED.items():
        if item.get(name) not in (accepted, "", []):
            raise InvalidOption(f"{where}.{name}", "an image", "null: sdrt's ControlNet units take no masks")
    if "control_mode" not in item and item.get("guessmode") is True:  # the API's older name for guess mode
        fields["control_mode"] = "ControlNet is more important"
    image = fields["image"] if fields["image"] is not None else item.get("input_image")
    if isinstance(image, dict):  # {"image": base64, "mask": base64 or null}
        if image.get("mask"):
            raise InvalidOption(f"{where}.image.mask", "an image", "null: sdrt's ControlNet units take no masks")
        image = image.get("image")
    if image in (None, ""):
        if init_image is None and fields["enabled"]:
            raise InvalidOption(f"{where}.image", None, "a base64-encoded control image (txt2img has no init image)")
        image = init_image
    else:
        try:
            image = server.decode(image, f"{where}.image")
        except UndecodableImage as e:
            raise InvalidOption(f"{where}.image", "undecodable data", "a base64-encoded PNG, JPEG or WebP") from e
    save = fields["save_detected_map"]
    if not isinstance(save, bool):
        raise InvalidOption(f"{where}.save_detected_map", save, "true or false")
    unit = ControlNetUnit(
        model=fields["model"],
        image=image,
        module=fields["module"],
        weight=fields["weight"],
        guidance_start=fields["guidance_start"],
        guidance_end=fields["guidance_end"],
        control_mode=fields["control_mode"],
        resize_mode=fields["resize_mode"],
        processor_res=fields["processor_res"],
        threshold_a=fields["threshold_a"],
        threshold_b=fields["threshold_b"],
        pixel_perfect=fields["pixel_perfect"],
        enabled=fields["enabled"],
    )
    return unit, save


def module_detail() -> dict:
    """The extension's module_detail: whether a module needs a model, and its sliders."""
    detail = {}
    for name, pre in PREPROCESSORS.items():
        sliders = []
        if pre.uses_resolution:
            sliders.append({"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048})
        for label, spec in (("Threshold A", pre.threshold_a), ("Threshold B", pre.threshold_b)):
            if spec is not None:
                sliders.append({"name": label, "value": spec[0], "min": spec[1], "max": spec[2]})
        detail[name] = {"model_free": name == "none", "sliders": sliders}
    return detail


def add_routes(app, server) -> None:
    @app.get("/controlnet/version")
    def version():
        return {"version": API_VERSION}

    @app.get("/controlnet/model_list")
    def model_list(update: bool = True):
        cache = controlnet_cache(server)  # None over Ray: no ControlNet there
        return {"model_list": [] if cache is None else [info.title for info in cache.available()]}

    @app.get("/controlnet/module_list")
    def module_list(alias_names: bool = False):
        return {"module_list": list(PREPROCESSORS), "module_detail": module_detail()}
