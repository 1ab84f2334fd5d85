"""Memory modes of a Pipeline: everything resident, or low-VRAM staging (one engine loaded at a time), UNet weight
streaming under a VRAM budget (TensorRT), and tiled VAE decode/encode."""

from dataclasses import dataclass

from sdrt.engines import create_engine
from sdrt.engines.capabilities import capabilities
from sdrt.engines.plan import StageCost, parse_size, plan_vram
from sdrt.errors import InvalidOption, is_int
from sdrt.runtime.deepcache import DEEPCACHE_SHALLOW
from sdrt.runtime.tiling import DEFAULT_OVERLAP, DEFAULT_TILE, tiling_for

# Activation bytes per latent cell per image of each engine in fp16 (TensorRT, fused attention), used to plan a
# VRAM budget before any engine runs. Estimates from published SD 1.5 figures (UNet ~1 GB at 512x512, batch 2;
# VAE decoder ~2.5 GB at 512x512 untiled), not measured by sdrt: the budget test on a GPU checks the plan.
ACTIVATION_PER_CELL = {"text_encoder": 0, "unet": 120_000, "vae_decoder": 600_000, "vae_encoder": 300_000,
                       "transformer": 120_000}  # the flow transformers: not measured yet, taken as the UNet
# A UNet with fused attention (sdrt optimize --target cuda: flash / memory-efficient MultiHeadAttention) holds no
# (heads, N, N) score matrix, 8 x 4096^2 x 2 bytes per sample at 512x512, which was ~100 KB of the 120 KB per cell
# above. What stays live at the 64x64 level, per latent cell per sample in fp16: the GEGLU projection (2560 channels,
# 5 KB) and its gated half (2.5 KB), packed QKV (1.9 KB), the down path's skip tensors (~3.4 KB over all levels),
# residual and concatenated up-path tensors (~3 KB): ~16 KB, rounded up to 20 KB for cuDNN's workspace. Derived
# from tensor sizes, not measured: the budget test on a GPU checks it.
FUSED_ACTIVATION_PER_CELL = {**ACTIVATION_PER_CELL, "unet": 20_000}
TEXT_ENCODER_ACTIVATIONS = 64 * 2**20
FP16_WEIGHT_SHARE = 0.5  # GPU engines are fp16: half the bytes of an fp32 export's files


@dataclass(frozen=True)
class MemoryPlan:
    """How a Pipeline holds its engines: `staged` (one at a time), engine options, VAE tiling in latent cells."""

    staged: bool = False
    vae_tile: int | None = None
    vram_budget: int | None = None
    unet_streaming_budget: int | None = None

    @property
    def tiling(self) -> tuple[int, int, int]:
        """(tile, overlap, margin) in latent cells (tiling.tiling_for)."""
        return tiling_for(self.vae_tile)

    def tiles(self, latent_shape) -> bool:
        """True if a latent of LATENT_SHAPE (..., h, w) is decoded in tiles."""
        return self.vae_tile is not None and max(latent_shape[-2:]) > self.vae_tile

    def create_engines(self, manifest, backend: str, fused: bool = True, static=None) -> dict:
        """The manifest's engines on BACKEND; under a Stager when staged. FUSED: the fused graph variants written for
        BACKEND (sdrt optimize) where there are some. STATIC: (width, height, batch), a static profile: the UNet and
        VAE decoder fixed at those shapes (engines.plan.static_dims), replayed as CUDA graphs on "cuda"."""
        from sdrt.runtime.families import family_of

        caps, denoiser = capabilities(backend), family_of(manifest).denoiser_model
        engines = {}
        dims = static_model_dims(manifest, static) if static is not None else {}
        for name in manifest.models:
            options = {}
            if caps.arena_limit and self.vram_budget:
                options["gpu_mem_limit"] = self.vram_budget
            if caps.weight_streaming and name == denoiser and self.unet_streaming_budget is not None:
                options["streaming_budget"] = self.unet_streaming_budget
            if name in dims and caps.static_shapes:
                options["static_dims"] = dims[name]
                options["cuda_graph"] = caps.graph_replay
            if caps.f32_text_encoders and name.startswith("text_encoder"):
                options["keep_f32"] = True  # bf16 or not, the text encoders run f32 (docs: OpenVINO)
            path = manifest.graph_path(name, caps.fused_target if fused else None)
            engines[name] = create_engine(path, backend, **options)
            if path != manifest.model_path(name) and caps.fused_weight_places:
                engines[name].export_file = manifest.model_path(name)  # LoRAs name the export's weights
        # DeepCache's shallow graph (a few percent of the UNet) stays beside the full one: staged, each full call
        # would load the UNet-sized graph again
        return Stager().wrap(engines, beside=(DEEPCACHE_SHALLOW,)) if self.staged else engines


def static_model_dims(manifest, static) -> dict:
    """{model: {axis: size}} of a static profile STATIC = (width, height, batch) (InvalidOption if malformed)."""
    from sdrt.engines.plan import static_dims

    ok = isinstance(static, (tuple, list)) and len(static) == 3 and all(is_int(v) and v > 0 for v in static)
    step = manifest.latent_downsample
    if not ok or static[0] % step or static[1] % step:
        raise InvalidOption("static", static, f"(width, height, batch): positive integers, sizes multiples of {step}")
    width, height, batch = (int(v) for v in static)
    from sdrt.runtime.families import family_of

    fixed = (family_of(manifest).denoiser_model, "vae_decoder")
    return {name: static_dims(name, width, height, batch, step, manifest.text_max_length)
            for name in fixed if name in manifest.models}  # fmt: skip


def memory_plan(
    manifest, backend: str, low_vram: bool = False, vram_budget=None, vae_tile=None, fused: bool = True, ram_budget=None
) -> MemoryPlan:
    """Validate the memory options and plan them. VAE_TILE is in pixels (a multiple of the latent downsample);
    LOW_VRAM alone stages the engines and tiles the VAE at DEFAULT_TILE; VRAM_BUDGET ('2GB') plans with plan_vram.

    On "cuda" the budget is ONNX Runtime's arena limit (gpu_mem_limit): weights, activations and workspace; the
    CUDA context and library handles (~0.3-0.5 GiB, the driver's) come on top, as in stable-diffusion.cpp's
    figures. FUSED: plan with the fused graph variants written for BACKEND where there are some. RAM_BUDGET: the
    same plan in host memory on the CPU backends (ram_budget.py)."""
    if not isinstance(low_vram, bool):
        raise InvalidOption("low_vram", low_vram, "True or False")
    step = manifest.latent_downsample
    tile = None
    if vae_tile is not None:
        if not is_int(vae_tile) or vae_tile % step or vae_tile <= 0:
            raise InvalidOption("vae_tile", vae_tile, f"a positive number of pixels, a multiple of {step}")
        tile = int(vae_tile) // step
        tiling_for(tile)  # refuses a tile too small to blend
    if ram_budget is not None:
        return ram_memory_plan(manifest, backend, ram_budget, tile, low_vram, fused)
    if vram_budget is None:
        if low_vram:
            return MemoryPlan(staged=True, vae_tile=tile or DEFAULT_TILE)
        return MemoryPlan(vae_tile=tile)
    budget = parse_size(vram_budget)
    native = manifest.native_size // step
    caps = capabilities(backend)
    target = caps.fused_target if fused else None
    weights, fused_models = {}, set()
    for name in manifest.models:
        if name == "unet_controlnet":  # runs instead of the UNet, only with ControlNets: not planned yet
            continue
        path = manifest.graph_path(name, target)
        variant = manifest.optimized.get(target, {}).get(name) if target else None
        precision = variant["precision"] if variant else manifest.models[name].get("precision", manifest.precision)
        share = FP16_WEIGHT_SHARE if caps.device_memory and precision == "fp32" else 1
        weights[name] = int(sum(f.stat().st_size for f in (path, path.with_name(path.name + ".data")) if f.is_file())
                            * share)  # fmt: skip
        if variant and variant["fused_ops"].get("MultiHeadAttention"):
            fused_models.add(name)
    stages = stage_costs(weights, native * native, backend, fused_models)
    # the CUDA context outside the engines (ONNX Runtime CUDA: the budget is its arena limit, the context outside)
    overhead = caps.context_bytes
    plan = plan_vram(budget, stages, vae_full_latent=native, overhead=overhead, tile_min=2 * DEFAULT_OVERLAP)
    planned_tile = tile or plan.vae_tile or (DEFAULT_TILE if plan.staged else None)
    return MemoryPlan(plan.staged or low_vram, planned_tile, vram_budget=budget,
                      unet_streaming_budget=plan.unet_streaming_budget)  # fmt: skip


def stage_costs(weights: dict, cells: int, backend: str, fused_attention=frozenset()) -> dict:
    """{model: StageCost} from WEIGHTS ({model: bytes on the device}) at CELLS latent cells per image; models in
    FUSED_ATTENTION run fused attention (FUSED_ACTIVATION_PER_CELL). Pure: the budget tests plan SD 1.5 with it."""
    streams = capabilities(backend).weight_streaming
    stages = {}
    for name, size in weights.items():
        batch = 2 if name == "unet" else 1  # a guided UNet step runs cond + uncond
        table = FUSED_ACTIVATION_PER_CELL if name in fused_attention else ACTIVATION_PER_CELL
        kind = name.split("_part")[0]  # a graph exported in parts (T5, FLUX's transformer) costs as its whole
        acts = TEXT_ENCODER_ACTIVATIONS if name.startswith("text_encoder") else table[kind] * cells * batch
        stages[name] = StageCost(size, acts, streamable=size if name == "unet" and streams else 0)
    return stages


class Stager:
    """Keeps at most one of its engines loaded: running one unloads the one before (low-VRAM / low-RAM mode).

    The pipeline runs text encoder -> UNet -> VAE, so each is loaded once per generation and freed after use.
    """

    def __init__(self):
        self.resident = None
        self.loads = 0  # engine loads so far (a measure of staging's cost)

    def wrap(self, engines: dict, beside=()) -> dict:
        """ENGINES staged, but those named in BESIDE: loaded when first run, kept beside the staged one."""
        return {name: engine if name in beside else StagedEngine(engine, self) for name, engine in engines.items()}

    def activate(self, staged: "StagedEngine") -> None:
        if self.resident is staged:
            return
        if self.resident is not None:
            self.resident.inner.unload()
            self.resident = None
        staged.inner.load()
        self.resident = staged
        self.loads += 1


class StagedEngine:
    """An engine that loads itself when it runs and is unloaded when another engine of its Stager runs."""

    def __init__(self, inner, stager: Stager):
        self.inner = inner
        self.stager = stager

    @property
    def input_names(self) -> list[str]:
        return self.inner.input_names

    @property
    def output_names(self) -> list[str]:
        return self.inner.output_names

    def load(self) -> None:
        """Deferred: the engine loads when it first runs."""

    def run(self, feeds: dict) -> dict:
        self.stager.activate(self)
        return self.inner.run(feeds)

    def unload(self) -> None:
        if self.stager.resident is self:
            self.stager.resident = None
        self.inner.unload()

    def __getattr__(self, name):  # the wrapped engine's other attributes (model_file, session, ...)
        return getattr(self.inner, name)


def ram_memory_plan(manifest, backend: str, ram_budget, vae_tile: int | None, low_vram: bool, fused: bool):
    """memory.MemoryPlan for RAM_BUDGET: staged when the plan says (or LOW_VRAM), the VAE tiled at VAE_TILE (latent
    cells, the user's) or at the plan's tile (or the default one when staged)."""
    from sdrt.runtime.families import family_of
    from sdrt.runtime.ram_budget import plan_ram

    target = capabilities(backend).fused_target if fused else None
    paths = {name: manifest.graph_path(name, target) for name in manifest.models if name != "unet_controlnet"}
    plan = plan_ram(manifest, backend, ram_budget, paths, family_of(manifest).denoiser_model)
    staged = plan.staged or low_vram
    return MemoryPlan(staged, vae_tile or plan.vae_tile or (DEFAULT_TILE if staged else None))
