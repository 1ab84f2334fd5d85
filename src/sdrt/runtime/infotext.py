"""The infotext: writing A1111's generation parameters, and reading them back (A1111's PNG "parameters" chunk,
JPEG/WebP EXIF comment, and ComfyUI's workflow PNGs) as GenerationOptions fields.

Both directions are derived from the options schema (options.py: each field's infotext key, writer and reader).
The parser follows A1111's parse_generation_parameters (modules/infotext_utils.py): the last line holds
"Key: value" pairs (values with a comma, colon or newline are JSON-quoted), the lines before it the prompt and
"Negative prompt: ...".
"""

import json

import regex

from sdrt.errors import InvalidOption
from sdrt.runtime.image import infotext
from sdrt.runtime.options import OPTION_FIELDS, GenerationOptions, spec
from sdrt.version import __version__

# A1111's re_param: a key of word characters, spaces, '-' and '/', then a quoted or comma-free value.
_PARAM = regex.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = regex.compile(r"^(\d+)x(\d+)$")
MAX_INFOTEXT_CHARS = 200_000  # a parameters chunk longer than this is not a real one

# Written beside the options' own keys: the model after "Size", the stages' notes before "Timestep spacing".
MODEL_AFTER, NOTES_BEFORE = "Size", "Timestep spacing"


def write_infotext(opts: GenerationOptions, seed: int, subseed: int, model: dict, notes: dict | None = None) -> str:
    """The "parameters" text of one image (seed, subseed: its own), with A1111's keys in A1111's order.

    MODEL: {"Model hash": ..., "Model": ...}; NOTES: what the stages add (emphasis, TI hashes, refiner, ...)."""
    params = {}
    for name in OPTION_FIELDS:
        s = spec(name)
        if s.infotext is None or s.write is None:
            continue
        if s.infotext == NOTES_BEFORE:
            params |= notes or {}
        params[s.infotext] = s.write(opts, (seed, subseed))
        if s.infotext == MODEL_AFTER:
            params |= model
    params["Version"] = f"sdrt {__version__}"
    return infotext(opts.prompt, opts.negative_prompt, params)


def parse_infotext(text: str) -> dict:
    """A1111's parse_generation_parameters: {"Prompt", "Negative prompt", key: value str, "Size-1", "Size-2", ...}.

    Keys A1111 fills in when absent ("Clip skip" 1, "RNG" GPU, "Schedule type" Automatic, "Emphasis" Original)
    are filled in the same way. Never raises on text: unparseable pairs are kept as prompt text, as A1111 does.
    """
    if not isinstance(text, str):
        raise InvalidOption("infotext", type(text).__name__, "a string")
    text = text[:MAX_INFOTEXT_CHARS]
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    params = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        value = value.strip()
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        size = _SIZE.match(value) if isinstance(value, str) else None
        if size:
            params[f"{key}-1"], params[f"{key}-2"] = size.group(1), size.group(2)
        else:
            params[key] = value
    for key, default in (("Clip skip", "1"), ("RNG", "GPU"), ("Schedule type", "Automatic"), ("Emphasis", "Original")):
        params.setdefault(key, default)
    return params


def read_parameters(image) -> tuple[str | None, str]:
    """(A1111 infotext or None, where it came from) of an open PIL image: PNG text chunk, EXIF UserComment
    (A1111's JPEG/WebP), or a ComfyUI workflow turned into an equivalent infotext."""
    info = image.info or {}
    text = info.get("parameters")
    if isinstance(text, str):
        return text, "A1111 parameters"
    comment = _exif_user_comment(image)
    if comment:
        return comment, "A1111 EXIF comment"
    if isinstance(info.get("prompt"), str):
        converted = comfyui_infotext(info["prompt"])
        if converted:
            return converted, "ComfyUI prompt graph"
        return None, "ComfyUI prompt graph without a KSampler"
    return None, "no generation parameters"


def _exif_user_comment(image) -> str | None:
    try:
        exif = image.getexif().get_ifd(0x8769)  # the Exif IFD
        raw = exif.get(0x9286)  # UserComment
    except Exception:  # noqa: BLE001 - any malformed EXIF just means "no comment"
        return None
    if isinstance(raw, bytes):
        head, body = raw[:8], raw[8:]
        if head.startswith(b"UNICODE"):
            return body.decode("utf-16-be", errors="replace").rstrip("\x00") or None
        return body.decode("utf-8", errors="replace").rstrip("\x00") or None
    return raw if isinstance(raw, str) and raw else None


def comfyui_infotext(prompt_json: str) -> str | None:
    """An A1111-style infotext from ComfyUI's "prompt" graph: its first KSampler, the CLIPTextEncode texts wired to
    its positive/negative inputs and the EmptyLatentImage size. None when the graph has no such sampler."""
    try:
        graph = json.loads(prompt_json)
    except ValueError:
        return None
    if not isinstance(graph, dict):
        return None
    nodes = {k: v for k, v in graph.items() if isinstance(v, dict) and isinstance(v.get("inputs"), dict)}
    samplers = [n["inputs"] for n in nodes.values() if n.get("class_type") in ("KSampler", "KSamplerAdvanced")]
    sampler = samplers[0] if samplers else None
    if sampler is None:
        return None

    def linked(name: str, field: str, class_type: str):
        link = sampler.get(name)
        node = nodes.get(str(link[0])) if isinstance(link, list) and link else None
        if node is None or node.get("class_type") != class_type:
            return None
        return node["inputs"].get(field)

    def text_of(name: str) -> str:
        value = linked(name, "text", "CLIPTextEncode")
        return value if isinstance(value, str) else ""

    width = linked("latent_image", "width", "EmptyLatentImage")
    height = linked("latent_image", "height", "EmptyLatentImage")
    params = {
        "Steps": sampler.get("steps"),
        "Sampler": COMFY_SAMPLERS.get(sampler.get("sampler_name"), sampler.get("sampler_name")),
        "Schedule type": COMFY_SCHEDULES.get(sampler.get("scheduler"), sampler.get("scheduler")),
        "CFG scale": sampler.get("cfg"),
        "Seed": sampler.get("seed", sampler.get("noise_seed")),
        "Size": f"{width}x{height}" if isinstance(width, int) and isinstance(height, int) else None,
        "RNG": "CPU",  # ComfyUI draws its noise on the CPU with torch
    }
    return infotext(text_of("positive"), text_of("negative"), params)


# ComfyUI's sampler and scheduler names -> A1111's.
COMFY_SAMPLERS = {
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "ddim": "DDIM",
    "uni_pc": "UniPC",
    "lcm": "LCM",
}
COMFY_SCHEDULES = {
    "normal": "Automatic",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "beta": "Beta",
}


def generate_kwargs(params: dict) -> dict:
    """GenerationOptions fields from parse_infotext's dict; keys sdrt does not know are left out.

    Values are converted to the field's type only; resolve validates them, so a bad value is refused there with
    the field named.
    """
    kwargs = {"prompt": params.get("Prompt", ""), "negative_prompt": params.get("Negative prompt", "")}
    for name in OPTION_FIELDS:
        s = spec(name)
        if s.infotext is None:
            continue
        for key in (s.infotext if s.part is None else f"{s.infotext}-{s.part}", *s.aliases):
            if key in params:
                kwargs[name] = _read(s, key, params[key])
    return kwargs


def _read(s, key: str, text):
    convert = s.read or {"int": int, "float": float}.get(s.kind, str)
    try:
        return convert(text)
    except InvalidOption:
        raise
    except (TypeError, ValueError):
        raise InvalidOption(key, text, f"a {s.kind} value in the infotext") from None
