"""The plain UNet and DeepCache's graphs are alternatives: a run uses one or the other. DeepCache's full graph holds a
copy of the UNet's weights (full-size SDXL: 10 GB in fp32), so holding both, as every engine once loaded stays
loaded, doubles the UNet's memory: full-size SDXL with DeepCache was killed for memory on a 24 GB machine (text
encoders 6 GB + plain UNet 10 GB + the full graph's 10 GB; measured with `python -m sdrt.bench.load_memory`).

Before a run switches between them, the graphs of the other kind are unloaded unless the machine has room for the new
ones beside them: host memory (MemAvailable) on the CPU backends; on a GPU, whose memory sdrt does not measure, the
other kind is always unloaded. A switch back loads them again (from ONNX Runtime's optimised-graph cache: seconds for
SD 1.5, longer for SDXL); images do not change either way.
"""

import os

# Headroom over a graph's bytes on disk to load it: ONNX Runtime's transient copies while it optimises and prepacks.
# Measured on full-size SDXL (python -m sdrt.bench.load_memory; docs/benchmarks/speed.md).
LOAD_HEADROOM = 1.25
RUN_MARGIN = 1 << 30  # activations of a run beside the weights (SDXL at 1024x1024, batch 2: ~1 GB)


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
    """Whether NAMES' engines can be loaded beside what is loaded now (host memory, CPU backends only)."""
    if any(model.engines[n].capabilities.device_memory for n in names):
        return False
    available = available_host_memory()
    need = sum(graph_bytes(model.manifest, n) for n in names) * LOAD_HEADROOM + RUN_MARGIN
    return available is not None and available >= need


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
