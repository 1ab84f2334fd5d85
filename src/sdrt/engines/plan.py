"""GPU engine plans as pure functions: optimisation profiles, buffer and workspace layouts, and VRAM budget
arithmetic (engine files' cache keys and refits: engine_files.py). No TensorRT, CUDA or ONNX Runtime here: all of
it runs in CI.

Axis names are those of sdrt.runtime.modelspec ("batch", "tokens", "latent_height", "latent_width").
"""

import math
import re
from dataclasses import asdict, dataclass

from sdrt.errors import InvalidOption, ModelError, is_int, is_number

TEXT_WINDOW = 77  # CLIP tokens per window, BOS and EOS included: text lengths are multiples of it
ALIGNMENT = 256  # bytes: cudaMalloc's alignment, and TensorRT's for I/O tensors and device memory
CUDA_CONTEXT_BYTES = 300 * 2**20  # CUDA context + cuBLAS/cuDNN handles, measured ~250-350 MiB on Ampere/Hopper
MIN_STREAMING_FRACTION = 0.05  # below this share of the UNet's weights resident, streaming is too slow to use
DTYPE_BYTES = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "bool": 1, "uint8": 1}
MODEL_ORDER = ("text_encoder", "unet", "vae_decoder", "vae_encoder")  # low-VRAM staging order
RESIDUAL_DOWNSCALES = (2, 4, 8)  # the unet_controlnet graph's residual inputs below the latent size (modelspec.py)


# ----------------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class ShapeRanges:
    """Declared (min, opt, max) of one engine build: images per batch, pixel height and width, 77-token windows.

    Static when every min == opt == max: one size, the fastest engine and the one CUDA graphs can replay.
    """

    batch: tuple[int, int, int] = (1, 1, 4)
    height: tuple[int, int, int] = (256, 512, 1024)
    width: tuple[int, int, int] = (256, 512, 1024)
    text_windows: tuple[int, int, int] = (1, 1, 3)

    @classmethod
    def static(cls, batch: int, height: int, width: int, text_windows: int = 1) -> "ShapeRanges":
        return cls((batch,) * 3, (height,) * 3, (width,) * 3, (text_windows,) * 3)

    @property
    def is_static(self) -> bool:
        return all(lo == opt == hi for lo, opt, hi in (self.batch, self.height, self.width, self.text_windows))

    def to_json(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}


def check_ranges(ranges: ShapeRanges, step: int = 8, min_size: int = 64, max_size: int = 2048) -> ShapeRanges:
    """RANGES if each is ordered min <= opt <= max and in bounds (sizes multiples of STEP), else InvalidOption."""
    for name, bounds, low, high, multiple in (
        ("batch", ranges.batch, 1, 64, 1),
        ("height", ranges.height, min_size, max_size, step),
        ("width", ranges.width, min_size, max_size, step),
        ("text_windows", ranges.text_windows, 1, 8, 1),
    ):
        ok = (
            isinstance(bounds, tuple)
            and len(bounds) == 3
            and all(is_int(v) for v in bounds)
            and low <= bounds[0] <= bounds[1] <= bounds[2] <= high
            and all(v % multiple == 0 for v in bounds)
        )
        if not ok:
            allowed = f"(min, opt, max) with {low} <= min <= opt <= max <= {high}"
            raise InvalidOption(name, bounds, allowed + (f", multiples of {multiple}" if multiple > 1 else ""))
    return ranges


def parse_range(field_name: str, text: str) -> tuple[int, int, int]:
    """'512' -> (512, 512, 512); '256-1024' -> (256, opt=256, 1024); '256:512:1024' -> (256, 512, 1024)."""
    parts = re.split(r"[:]", text) if ":" in str(text) else str(text).split("-")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise InvalidOption(field_name, text, "N, MIN-MAX or MIN:OPT:MAX (integers)") from None
    if len(values) == 1:
        return (values[0],) * 3
    if len(values) == 2:
        return (values[0], values[0], values[1])
    if len(values) == 3:
        return tuple(values)
    raise InvalidOption(field_name, text, "N, MIN-MAX or MIN:OPT:MAX (integers)")


def axis_ranges(model: str, ranges: ShapeRanges, latent_downsample: int, guided: bool = True) -> dict:
    """{axis name: (min, opt, max)} for MODEL's inputs.

    UNet batch is doubled under classifier-free guidance (cond + uncond in one call), its text length is
    77 * windows; the text encoder sees windows of 77 tokens stacked on the batch axis (prompt and negative
    prompt: 2 per window); the VAE runs one image per call (Pipeline.decode, and one tile per call when tiled).
    """
    lat_h = tuple(v // latent_downsample for v in ranges.height)
    lat_w = tuple(v // latent_downsample for v in ranges.width)
    if model in ("unet", "unet_controlnet", "unet_deepcache", "unet_shallow"):  # DeepCache's feature: height_k
        lo, opt, hi = ranges.batch
        factor = 2 if guided else 1  # a static engine runs one batch size: guided, cond + uncond
        batch = (factor * lo if ranges.is_static else lo, factor * opt, factor * hi)
        tokens = tuple(TEXT_WINDOW * k for k in ranges.text_windows)
        axes = {"batch": batch, "tokens": tokens, "latent_height": lat_h, "latent_width": lat_w}
        for k in RESIDUAL_DOWNSCALES:  # ControlNet residuals at 1/k of the latent size (stride-2 convs round up)
            axes |= {f"height_{k}": tuple(-(-v // k) for v in lat_h), f"width_{k}": tuple(-(-v // k) for v in lat_w)}
        return axes
    if model.startswith("text_encoder"):  # text_encoder, text_encoder_2 (SDXL)
        lo, opt, hi = ranges.text_windows
        factor = 2 if guided else 1
        return {"batch": (factor * lo if ranges.is_static else 1, factor * opt, 2 * hi), "tokens": (TEXT_WINDOW,) * 3}
    if model in ("vae_decoder", "vae_encoder", "taesd_decoder", "vae_approx"):
        return {"batch": (1, 1, 1), "latent_height": lat_h, "latent_width": lat_w, "height": ranges.height,
                "width": ranges.width}  # fmt: skip
    raise InvalidOption("model", model, ", ".join(MODEL_ORDER))


def static_dims(model: str, width: int, height: int, batch: int, latent_downsample: int, text_tokens: int = 77,
                guided: bool = True) -> dict:
    """{axis name: size} of MODEL's inputs under a static profile: BATCH images of WIDTH x HEIGHT pixels, one text
    window of TEXT_TOKENS (ONNX Runtime's free dimension overrides; axis_ranges' sizes at min == opt == max)."""
    ranges = ShapeRanges.static(batch, height, width, max(1, text_tokens // TEXT_WINDOW))
    dims = {axis: opt for axis, (_, opt, _) in axis_ranges(model, ranges, latent_downsample, guided).items()}
    if "tokens" in dims:
        dims["tokens"] = text_tokens
    return dims


def plan_profile(model: str, inputs: list[dict], ranges: ShapeRanges, latent_downsample: int, guided=True) -> dict:
    """{input name: (min shape, opt shape, max shape)} for a TensorRT optimisation profile.

    INPUTS are the manifest's tensor specs ({"name", "dtype", "shape"}; str dims are dynamic axes).
    """
    axes = axis_ranges(model, ranges, latent_downsample, guided)
    profile = {}
    for tensor in inputs:
        shapes = [[], [], []]
        for dim in tensor["shape"]:
            if isinstance(dim, str) and dim not in axes:
                raise ModelError(f"{model} input {tensor['name']!r} has axis {dim!r}, which no profile declares")
            values = axes[dim] if isinstance(dim, str) else (dim, dim, dim)
            for shape, v in zip(shapes, values, strict=True):
                shape.append(int(v))
        profile[tensor["name"]] = tuple(tuple(s) for s in shapes)
    return profile


def profile_covers(profile: dict, shapes: dict) -> bool:
    """True if every input shape in SHAPES ({name: shape}) lies within PROFILE's min..max."""
    for name, shape in shapes.items():
        lo, _, hi = profile[name]
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False
    return True


def static_profile(profile: dict) -> bool:
    return all(lo == opt == hi for lo, opt, hi in profile.values())


def tensor_bytes(shape, dtype: str) -> int:
    return math.prod(int(d) for d in shape) * DTYPE_BYTES[dtype]


def aligned(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def buffer_plan(tensors: dict) -> tuple[dict, int]:
    """One device allocation for all I/O tensors ({name: (shape, dtype)}): ({name: (offset, bytes)}, total bytes).

    Each tensor starts at an ALIGNMENT boundary; sized for the largest shapes the profile allows.
    """
    offsets, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        size = tensor_bytes(shape, dtype)
        offsets[name] = (offset, size)
        offset += aligned(size)
    return offsets, offset


def io_tensors(model_inputs: list[dict], model_outputs: list[dict], profile: dict, axes: dict, dtypes=None) -> dict:
    """{name: (largest shape, dtype)} of a model's I/O under PROFILE (outputs from AXES' maxima)."""
    dtypes = dtypes or {}
    tensors = {t["name"]: (profile[t["name"]][2], dtypes.get(t["name"], t["dtype"])) for t in model_inputs}
    for t in model_outputs:
        shape = tuple(axes[d][2] if isinstance(d, str) else d for d in t["shape"])
        tensors[t["name"]] = (shape, dtypes.get(t["name"], t["dtype"]))
    return tensors


def shared_workspace(sizes: dict) -> int:
    """Bytes of one activation workspace shared by engines run one after another on one stream: the largest."""
    return aligned(max(sizes.values(), default=0))


# ----------------------------------------------------------------------------------------------- VRAM budget

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(value, field_name: str = "vram_budget") -> int:
    """'2GB', '1.5 GiB', '2048M', 2e9 -> bytes (binary units: a GPU's '8 GB' is 8 GiB)."""
    if is_number(value) and value > 0:
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(value).upper()) if value is not None else None
    if m is None or float(m.group(1)) <= 0:
        raise InvalidOption(field_name, value, "a positive size such as 2GB, 1.5GiB, 3000MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@dataclass(frozen=True)
class StageCost:
    """Device memory one engine needs: its weights and its activation workspace (at the largest shapes run)."""

    weights: int
    activations: int
    io: int = 0
    streamable: int = 0  # of the weights, how many bytes TensorRT weight streaming can leave in host memory


@dataclass(frozen=True)
class VramPlan:
    budget: int
    staged: bool  # engines loaded one at a time (text encoder -> UNet -> VAE) and freed after use
    unet_streaming_budget: int | None  # bytes of UNet weights kept on the GPU (None: all of them)
    vae_tile: int | None  # latent cells per VAE tile side (None: untiled)
    peak: int  # planned peak bytes
    notes: tuple[str, ...] = ()


def plan_vram(
    budget: int, stages: dict, vae_full_latent: int = 64, overhead: int = CUDA_CONTEXT_BYTES, tile_min: int = 32
) -> VramPlan:
    """How to run STAGES ({name: StageCost}) within BUDGET bytes of device memory, cheapest first:
    everything resident; else one engine at a time; then UNet weight streaming; then VAE tiling.

    Activation costs are taken to scale with pixel area, so a VAE tile of t latent cells costs
    (t / VAE_FULL_LATENT)^2 of the full decode's activations. InvalidOption if no plan fits.
    """
    everything = overhead + sum(s.weights + s.io for s in stages.values()) + max(s.activations for s in stages.values())
    if everything <= budget:
        return VramPlan(budget, False, None, None, everything, ("all engines resident",))
    notes = ["engines staged one at a time"]
    streaming, tile, peak = None, None, 0
    for name, s in stages.items():
        need = overhead + s.weights + s.activations + s.io
        if need <= budget:
            peak = max(peak, need)
            continue
        if name == "unet" and s.streamable:
            fixed = overhead + (s.weights - s.streamable) + s.activations + s.io
            room = budget - fixed
            if room < MIN_STREAMING_FRACTION * s.streamable:
                least = fixed + math.ceil(MIN_STREAMING_FRACTION * s.streamable)
                raise InvalidOption("vram_budget", budget, f"at least {least / 2**30:.2f} GiB for this UNet")
            streaming = int(room)
            notes.append(f"UNet weight streaming: {room / 2**20:.0f} MiB of {s.streamable / 2**20:.0f} MiB resident")
            peak = max(peak, budget)
            continue
        if name.startswith("vae"):
            room = budget - overhead - s.weights - s.io
            t = vae_full_latent
            while t > tile_min and s.activations * (t / vae_full_latent) ** 2 > room:
                t -= 8
            if s.activations * (t / vae_full_latent) ** 2 <= room:
                tile = t if tile is None else min(tile, t)
                notes.append(f"{name} tiled at {t} latent cells")
                peak = max(peak, overhead + s.weights + s.io + int(s.activations * (t / vae_full_latent) ** 2))
                continue
        least = overhead + s.weights + s.io + (s.activations if not name.startswith("vae") else 0)
        raise InvalidOption("vram_budget", budget, f"at least {least / 2**30:.2f} GiB ({name} alone needs more)")
    return VramPlan(budget, True, streaming, tile, peak, tuple(notes))
