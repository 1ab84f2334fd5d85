"""`sdrt build MODEL_DIR`: fp16 TensorRT engines from an exported model's ONNX files.

Written against the TensorRT 10 Python API (Builder, strongly typed networks, OnnxParser, optimisation profiles,
timing cache, memory-pool limits, IProgressMonitor, weight streaming, refit); imports tensorrt only (no torch).
NOT YET RUN: no GPU or TensorRT was available where it was written; tests/test_gpu.py (marked tensorrt) runs it.
Plans (profiles, cache keys) come from sdrt.engines.plan, tested in CI.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from sdrt.engines.engine_files import EngineIdentity, source_fingerprint
from sdrt.engines.plan import ShapeRanges, check_ranges, plan_profile
from sdrt.engines.tensorrt import ENGINES_DIR, compute_capability, device_name
from sdrt.errors import InvalidOption, ModelError, SdrtError
from sdrt.runtime.manifest import Manifest

DEFAULT_BUILDER_WORKSPACE = 4 * 2**30  # bytes of scratch the builder may try tactics with


def _progress_monitor(trt, out=sys.stderr):
    """A trt.IProgressMonitor printing each top-level phase's progress on one line."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.steps = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = (parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            parent, total = self.steps.get(phase_name, (None, 0))
            if parent is None:
                print(f"\r  {phase_name}: {step + 1}/{total}", end="", file=out, flush=True)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            if self.steps.pop(phase_name, (None, 0))[0] is None:
                print(file=out, flush=True)

    return Monitor()


def build_engine(
    manifest: Manifest, name: str, ranges: ShapeRanges, builder_workspace: int = DEFAULT_BUILDER_WORKSPACE,
    weight_streaming: bool = False, refit: bool = False, progress: bool = True,
) -> Path:  # fmt: skip
    """Build (or find already built) the engine of model NAME for RANGES; returns its .plan path."""
    import tensorrt as trt

    onnx_file = manifest.model_path(name)
    guided = True
    profile = plan_profile(name, manifest.models[name]["inputs"], ranges, manifest.latent_downsample, guided)
    identity = EngineIdentity(
        model=name,
        compute_capability=compute_capability(),
        trt_version=trt.__version__,
        precision="fp16",
        profile=profile,
        source_hash=source_fingerprint(onnx_file),
        options={"weight_streaming": weight_streaming, "refit": refit},
    )
    folder = manifest.folder / ENGINES_DIR / name
    plan_path = folder / f"{identity.key()}.plan"
    if plan_path.is_file() and plan_path.with_suffix(".json").is_file():
        print(f"{name}: engine {identity.key()} already built", file=sys.stderr)
        return plan_path
    folder.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # An fp16 export carries its precision in the graph: build it strongly typed (TensorRT keeps the ONNX types,
    # which weight streaming requires; TensorRT 11 builds nothing else and ignores the flag). An fp32 export is
    # built weakly typed with fp16 kernels allowed, which only TensorRT 10 offers (BuilderFlag.FP16).
    strongly_typed = manifest.precision == "fp16"
    if not strongly_typed and not hasattr(trt.BuilderFlag, "FP16"):
        raise ModelError(f"TensorRT {trt.__version__} builds strongly typed networks only, in the ONNX graph's "
                         f"precision: export the model with `sdrt export --precision fp16`")  # fmt: skip
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 1 << int(strong) if strongly_typed and strong is not None else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):  # reads external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(builder_workspace))
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if weight_streaming:
        if not strongly_typed:
            raise ModelError("weight streaming needs an fp16 export (`sdrt export --precision fp16`)")
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    opt_profile = builder.create_optimization_profile()
    for tensor, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(tensor, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    cache_file = manifest.folder / ENGINES_DIR / f"timing-sm{identity.compute_capability}-trt{trt.__version__}.cache"
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if progress:
        config.progress_monitor = _progress_monitor(trt)
    kind = "static" if ranges.is_static else "dynamic"
    print(f"{name}: building {kind} engine {identity.key()} on {device_name()}", file=sys.stderr)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"TensorRT failed to build {name} (see its messages above); a smaller --builder-workspace "
                         "or a static profile needs less memory")  # fmt: skip
    seconds = time.perf_counter() - start
    _write_atomic(cache_file, bytes(config.get_timing_cache().serialize()))
    _write_atomic(plan_path, bytes(serialized))
    meta = {"identity": identity.to_json(), "build_s": seconds, "ranges": ranges.to_json(), "gpu": device_name(),
            "bytes": plan_path.stat().st_size}  # fmt: skip
    _write_atomic(plan_path.with_suffix(".json"), json.dumps(meta, indent=2).encode())
    print(f"{name}: built in {seconds:.1f} s ({plan_path.stat().st_size / 2**20:.0f} MiB)", file=sys.stderr)
    return plan_path


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def build(
    model_dir, ranges: ShapeRanges, models: tuple[str, ...] | None = None, builder_workspace=DEFAULT_BUILDER_WORKSPACE,
    weight_streaming: bool = False, refit: bool = False, progress: bool = True,
) -> dict[str, Path]:  # fmt: skip
    """Engines for MODEL_DIR's models (default: all), one at a time so the builder holds one network in memory."""
    manifest = Manifest.load(Path(model_dir))
    check_ranges(ranges, manifest.latent_downsample, manifest.min_size, manifest.max_size)
    names = models or tuple(manifest.models)
    for name in names:
        if name not in manifest.models:
            raise InvalidOption("--models", name, ", ".join(manifest.models))
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        raise SdrtError(f"`sdrt build` needs TensorRT: pip install 'sdrt[tensorrt]' ({e})") from None
    return {
        name: build_engine(manifest, name, ranges, builder_workspace, weight_streaming and name == "unet", refit,
                           progress)  # fmt: skip
        for name in names
    }
