"""A RAM budget on the CPU backends: `Pipeline.load(..., ram_budget="6GB")`, `--ram-budget 6GB`.

The low-VRAM plan (engines/plan.py plan_vram), priced in host memory (engines/host_memory.py: each engine's weights
and activations): everything resident when it fits; else the engines staged one at a time (text encoder -> UNet ->
VAE, each freed after use); then the VAE tiled; refused, with the least budget that could work, when the UNet alone
does not fit. The plan is made at the model's native size; larger images need more room for activations.
"""

from sdrt.engines import host_memory
from sdrt.engines.plan import StageCost, parse_size, plan_vram
from sdrt.errors import InvalidOption

TEXT_ENCODER_ACTIVATIONS = 64 * 2**20
# The process around the engines: the interpreter, numpy, ONNX Runtime's or OpenVINO's libraries, the tokenizer,
# the token embedding table (SD 1.5: 152 MB), images and latents: measured 0.08 GiB for the interpreter and the
# libraries, rounded up for the rest.
PROCESS_OVERHEAD = 400 * 2**20
VAE_TILE_MIN = 16  # latent cells: the smallest VAE tile the plan goes down to (tiling.py blends 8-cell overlaps)


def ram_stage_costs(manifest, backend: str, paths: dict, denoiser: str = "unet") -> dict:
    """{graph: StageCost} in host memory for the graphs in PATHS ({graph: ONNX file}) at the model's native size;
    DENOISER: the family's denoiser graph (priced at the UNet's rate, at batch 2: cond + uncond)."""
    native = manifest.native_size // manifest.latent_downsample
    stages = {}
    for name, path in paths.items():
        files = (path, path.with_name(path.name + ".data"))
        weights = int(sum(f.stat().st_size for f in files if f.is_file()) * host_memory.weight_share(backend, name))
        if name.startswith("text_encoder"):
            activations = TEXT_ENCODER_ACTIVATIONS
        else:
            kind = name if name in ("vae_decoder", "vae_encoder") else "unet"
            batch = 2 if name == denoiser else 1  # a guided step runs cond + uncond
            activations = host_memory.activation_per_cell(backend, kind) * native * native * batch
        stages[name] = StageCost(weights, activations)
    return stages


def plan_ram(manifest, backend: str, ram_budget, paths: dict, denoiser: str = "unet"):
    """engines.plan.VramPlan for RAM_BUDGET ('6GB', bytes) on a CPU BACKEND; InvalidOption naming ram_budget when
    the backend is not a CPU one or no plan fits."""
    if not host_memory.holds_weights_in_host_memory(backend):
        raise InvalidOption("ram_budget", ram_budget, "a budget for the CPU backends (cpu, openvino on the CPU); "
                            f"{backend} plans device memory with vram_budget")  # fmt: skip
    budget = parse_size(ram_budget, "ram_budget")
    stages = ram_stage_costs(manifest, backend, paths, denoiser)
    native = manifest.native_size // manifest.latent_downsample
    try:
        return plan_vram(budget, stages, vae_full_latent=native, overhead=PROCESS_OVERHEAD, tile_min=VAE_TILE_MIN)
    except InvalidOption as e:  # plan_vram names the VRAM budget: the same plan, here for RAM
        raise InvalidOption("ram_budget", ram_budget, f"{e.allowed} on {backend}") from None
