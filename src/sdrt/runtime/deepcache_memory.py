"""The plain UNet and DeepCache's graphs are alternatives: a run uses one or the other. DeepCache's full graph holds a
copy of the UNet's weights (full-size SDXL: 9.6 GiB in fp32), so holding both, as every engine once loaded stays
loaded, doubles the UNet's memory: full-size SDXL with DeepCache was killed for memory on a 23.5 GiB machine. Measured
with `python -m sdrt.bench.load_memory` (ONNX Runtime CPU): text encoders 2.9 GiB, VAE decoder 0.5 GiB, DeepCache's
graphs 9.3 GiB (12.7 GiB in all); the plain UNet's 9.3 GiB on top left no room for a run.

Before a run switches between them, the graphs of the other kind are unloaded unless the machine has room for the new
ones beside them: host memory (MemAvailable) on the CPU backends; on a GPU, whose memory sdrt does not measure, the
other kind is always unloaded. A switch back loads them again (from ONNX Runtime's optimised-graph cache: 9 s for
SDXL's UNet here); images do not change either way.
"""

import os

from sdrt.engines.host_memory import ACTIVATION_PER_CELL

# Headroom over a graph's bytes on disk to load it. Measured (ONNX Runtime 1.32, full-size SDXL's 9.57 GiB full graph):
# +9.3 GiB optimised in memory, a 9.86 GiB peak filling the optimised-graph cache, 8.46 GiB read from it; the rest
# is for other backends' compile copies (not measured).
LOAD_HEADROOM = 1.25


def available_host_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux MemAvailable; psutil elsewhere); None unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def graph_bytes(manifest, name: str) -> int:
    """NAME's ONNX file and external data on disk."""
    path = manifest.model_path(name)
    return sum(os.path.getsize(f) for f in (path, path.with_name(path.name + ".data")) if f.is_file())


def room_for(model, names) -> bool:
    """Whether NAMES' engines can be loaded beside what is loaded now, with a guided run's activations at the model's
    native size (ONNX Runtime's rate, ram_budget.py's): host memory, CPU backends only."""
    if any(model.engines[n].capabilities.device_memory for n in names):
        return False
    available = available_host_memory()
    return available is not None and available >= need_bytes(model.manifest, names)


def need_bytes(manifest, names) -> int:
    """Host memory to load NAMES and run a guided step (batch 2) at MANIFEST's native size."""
    cells = (manifest.native_size // manifest.latent_downsample) ** 2
    weights = sum(graph_bytes(manifest, n) for n in names) * LOAD_HEADROOM
    return int(weights + ACTIVATION_PER_CELL["onnxruntime"]["unet"] * cells * 2)


def use_denoiser(model, kind: str, kinds: dict) -> None:
    """Before a run of MODEL (generation.Model) on the denoiser graphs of KIND (KINDS: {kind: its graph names}, e.g.
    "plain" and "deepcache"): when they are not loaded and do not fit beside the other kinds', unload those.
    MODEL.denoiser_kinds: the kinds loaded ("plain" at first: Pipeline.load loads the plain UNet)."""
    if kind in model.denoiser_kinds:
        return
    if not room_for(model, kinds[kind]):
        for other in model.denoiser_kinds:
            for name in kinds[other]:
                model.engines[name].unload()
        model.denoiser_kinds.clear()
    model.denoiser_kinds.add(kind)
