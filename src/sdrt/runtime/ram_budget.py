"""A RAM budget on the CPU backends: `Pipeline.load(..., ram_budget="6GB")`, `--ram-budget 6GB`.

The low-VRAM plan (engines/plan.py plan_vram), priced in host memory: everything resident when it fits; else the
engines staged one at a time (text encoder -> UNet -> VAE, each freed after use); then the VAE tiled; refused, with
the least budget that could work, when the UNet alone does not fit. Weights count once (ONNX Runtime maps its
weights; OpenVINO holds its compiled copy alone: engines/mapped.py), at half their bytes where OpenVINO runs bf16.
The plan is made at the model's native size; larger images need more room for activations.
"""

from sdrt.engines.plan import StageCost, parse_size, plan_vram
from sdrt.errors import InvalidOption

# Activation bytes per latent cell per image on the CPU, from benchmarks/graph_memory.py on SD 1.5 at 256x256 (each
# graph's peak RSS less its weights and the bare interpreter's 0.08 GiB), rounded up. ONNX Runtime (its memory pattern
# plans every intermediate of a run at once): UNet 0.45 GiB for 2 x 1024 cells, VAE decoder 0.67 GiB and encoder
# 0.31 GiB for 1024. OpenVINO f32: UNet 0.27 GiB (bf16 0.79 GiB, counted here at the f32 rate plus half-size
# weights), VAE decoder 0.42 GiB (bf16 0.33), encoder 0.26 GiB. Activations are taken to scale with the area.
RAM_ACTIVATION_PER_CELL = {
    "cpu": {"unet": 240_000, "vae_decoder": 700_000, "vae_encoder": 350_000},
    "openvino": {"unet": 200_000, "vae_decoder": 450_000, "vae_encoder": 300_000},
}
TEXT_ENCODER_ACTIVATIONS = 64 * 2**20
# The process around the engines: the interpreter, numpy, ONNX Runtime's or OpenVINO's libraries, the tokenizer,
# the token embedding table (SD 1.5: 152 MB), images and latents: measured 0.08 GiB for the interpreter and the
# libraries, rounded up for the rest.
PROCESS_OVERHEAD = 400 * 2**20
BF16_SHARE = 0.5  # OpenVINO's compiled bf16 weights: half the f32 file's bytes
VAE_TILE_MIN = 16  # latent cells: the smallest VAE tile the plan goes down to (tiling.py blends 8-cell overlaps)


def cpu_backend(backend: str) -> bool:
    """A backend whose engines live in host memory: ONNX Runtime CPU, OpenVINO on the CPU."""
    from sdrt.engines.openvino import is_openvino_backend, parse_backend

    return backend == "cpu" or (is_openvino_backend(backend) and parse_backend(backend).device == "CPU")


def weight_share(backend: str, name: str) -> float:
    """The fraction of a graph's f32 file bytes its engine holds: 0.5 for OpenVINO bf16 (text encoders stay f32)."""
    from sdrt.engines.openvino import is_openvino_backend, parse_backend, resolve_precision

    if not is_openvino_backend(backend) or name.startswith("text_encoder"):
        return 1.0
    return BF16_SHARE if resolve_precision(parse_backend(backend)) == "bf16" else 1.0


def ram_stage_costs(manifest, backend: str, paths: dict) -> dict:
    """{graph: StageCost} in host memory for the graphs in PATHS ({graph: ONNX file}) at the model's native size."""
    native = manifest.native_size // manifest.latent_downsample
    table = RAM_ACTIVATION_PER_CELL["openvino" if backend != "cpu" else "cpu"]
    stages = {}
    for name, path in paths.items():
        files = (path, path.with_name(path.name + ".data"))
        weights = int(sum(f.stat().st_size for f in files if f.is_file()) * weight_share(backend, name))
        if name.startswith("text_encoder"):
            activations = TEXT_ENCODER_ACTIVATIONS
        else:
            batch = 2 if name == "unet" else 1  # a guided UNet step runs cond + uncond
            activations = table[name] * native * native * batch
        stages[name] = StageCost(weights, activations)
    return stages


def plan_ram(manifest, backend: str, ram_budget, paths: dict):
    """engines.plan.VramPlan for RAM_BUDGET ('6GB', bytes) on a CPU BACKEND; InvalidOption naming ram_budget when
    the backend is not a CPU one or no plan fits."""
    if not cpu_backend(backend):
        raise InvalidOption("ram_budget", ram_budget, "a budget for the CPU backends (cpu, openvino on the CPU); "
                            f"{backend} plans device memory with vram_budget")  # fmt: skip
    budget = parse_size(ram_budget, "ram_budget")
    stages = ram_stage_costs(manifest, backend, paths)
    native = manifest.native_size // manifest.latent_downsample
    try:
        return plan_vram(budget, stages, vae_full_latent=native, overhead=PROCESS_OVERHEAD, tile_min=VAE_TILE_MIN)
    except InvalidOption as e:  # plan_vram names the VRAM budget: the same plan, here for RAM
        raise InvalidOption("ram_budget", ram_budget, f"{e.allowed} on {backend}") from None


def ram_memory_plan(manifest, backend: str, ram_budget, vae_tile: int | None, low_vram: bool, fused: bool):
    """memory.MemoryPlan for RAM_BUDGET: staged when the plan says (or LOW_VRAM), the VAE tiled at VAE_TILE (latent
    cells, the user's) or at the plan's tile (or the default one when staged)."""
    from sdrt.runtime.memory import MemoryPlan
    from sdrt.runtime.tiling import DEFAULT_TILE

    target = backend if fused and backend == "cpu" else None
    paths = {name: manifest.graph_path(name, target) for name in manifest.models if name != "unet_controlnet"}
    plan = plan_ram(manifest, backend, ram_budget, paths)
    staged = plan.staged or low_vram
    return MemoryPlan(staged, vae_tile or plan.vae_tile or (DEFAULT_TILE if staged else None))
