"""OpenVINO backend: sdrt's exported ONNX graphs compiled by OpenVINO, with static shapes (one compiled model per
input shape), bf16 on CPUs that have AVX512_BF16 or AMX, and OpenVINO's model cache on disk.

Backend names (`backend=`, `--backend`): "openvino" plus optional "-DEVICE" and "-PRECISION" parts, in any order:
"openvino" (CPU, precision auto), "openvino-f32", "openvino-bf16", "openvino-gpu", "openvino-npu-f32", ...
"""

import functools
import hashlib
import importlib.util
import logging
import os
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt import cache_files
from sdrt.engines.cpu_host import physical_cores
from sdrt.engines.mapped import ReleasingPages
from sdrt.engines.openvino_graph import drop_zero_terms
from sdrt.engines.openvino_ir import graph_source
from sdrt.errors import InvalidOption, ModelError

PRECISIONS = ("auto", "f32", "bf16")
DEVICES = ("cpu", "gpu", "npu")  # OpenVINO's CPU, GPU (Intel), NPU plugins; "gpu.1" picks a second GPU
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names; OpenVINO's CPU plugin runs bf16 on either
BACKEND_FORM = "openvino[-cpu|-gpu|-gpu.N|-npu][-auto|-f32|-bf16]"
# Compiled models kept per engine, least recently used dropped first. Each holds its own copy of the weights in the
# plugin's layout (measured: two UNet shapes, two copies), so a few: the sizes a session alternates between.
MAX_CACHED_SHAPES = 2
INSTALL_HINT = "pip install 'sdrt[openvino]'"
log = logging.getLogger("sdrt.engines")
NO_BF16_REASON = "this CPU has neither AVX512_BF16 nor AMX: OpenVINO runs no bf16 here (it emulates nothing)"


@dataclass(frozen=True)
class OpenVINOTarget:
    """What an "openvino..." backend name asks for: an OpenVINO device and a precision (before resolution)."""

    device: str = "CPU"  # OpenVINO device name: "CPU", "GPU", "GPU.1", "NPU"
    precision: str = "auto"  # "auto", "f32" or "bf16"

    @property
    def name(self) -> str:
        """The canonical backend name: 'openvino', 'openvino-bf16', 'openvino-gpu-f32'."""
        parts = ["openvino"]
        if self.device != "CPU":
            parts.append(self.device.lower())
        if self.precision != "auto":
            parts.append(self.precision)
        return "-".join(parts)


def is_openvino_backend(backend) -> bool:
    return isinstance(backend, str) and (backend == "openvino" or backend.startswith("openvino-"))


def parse_backend(backend: str) -> OpenVINOTarget:
    """'openvino-gpu-f32' -> OpenVINOTarget("GPU", "f32"); InvalidOption naming the backend for anything else."""
    parts = backend.split("-")
    if parts[0] != "openvino":
        raise InvalidOption("backend", backend, BACKEND_FORM)
    device = precision = None
    for part in parts[1:]:
        if part in PRECISIONS and precision is None:
            precision = part
        elif re.fullmatch(r"(cpu|gpu(\.\d+)?|npu)", part) and device is None:
            device = part.upper()
        else:
            raise InvalidOption("backend", backend, BACKEND_FORM)
    return OpenVINOTarget(device or "CPU", precision or "auto")


def openvino_available() -> bool:
    """The openvino package is importable (nothing is imported to find out)."""
    return importlib.util.find_spec("openvino") is not None


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def cpu_has_bf16() -> bool:
    """True if the CPU computes bf16 natively (AVX512_BF16 or AMX): OpenVINO runs bf16 only there."""
    flags = cpu_flags()
    if flags:
        return any(flag in flags for flag in BF16_CPU_FLAGS)
    try:  # no /proc/cpuinfo (not Linux): ask OpenVINO
        return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:
        return False


def resolve_precision(target: OpenVINOTarget) -> str | None:
    """The INFERENCE_PRECISION_HINT for TARGET: "bf16" or "f32"; None leaves the device's default (an Intel GPU's f16).

    On the CPU, "auto" is bf16 where the CPU has it and f32 elsewhere; "bf16" on a CPU without it is refused (OpenVINO
    would silently run f32). bf16 is a CPU precision: a GPU or NPU runs its default (f16) or f32.
    """
    backend = target.name
    if target.device == "CPU":
        if target.precision == "auto":
            return "bf16" if cpu_has_bf16() else "f32"
        if target.precision == "bf16" and not cpu_has_bf16():
            raise InvalidOption("backend", backend, "openvino or openvino-f32 on this CPU: it has neither AVX512_BF16 "
                                "nor AMX, which OpenVINO's bf16 needs (it emulates nothing)")  # fmt: skip
        return target.precision
    if target.precision == "bf16":
        device = target.device.lower()
        allowed = f"openvino-{device} (the device's default precision, f16 on Intel GPUs) or openvino-{device}-f32"
        raise InvalidOption("backend", backend, allowed + ": bf16 is for CPUs")
    return None if target.precision == "auto" else target.precision


def describe(target: OpenVINOTarget) -> str:
    """'CPU, bf16 (the CPU has AVX512_BF16 or AMX)': where and how TARGET runs, for the one-line announcement."""
    precision = resolve_precision(target)
    if target.device != "CPU":
        return f"{target.device}, {precision or 'the device default precision'} (untested by sdrt)"
    text = ", text encoder f32" if precision == "bf16" else ""
    if target.precision == "auto":
        why = "the CPU has AVX512_BF16 or AMX" if precision == "bf16" else "the CPU has no AVX512_BF16 or AMX"
        return f"CPU, {precision}{text} ({why})"
    return f"CPU, {precision}{text}"


def cache_root() -> Path:
    """sdrt's cache folder ($SDRT_CACHE, else ~/.cache/sdrt); OpenVINO's compiled-model cache lives in openvino/."""
    return Path(os.environ.get("SDRT_CACHE", Path.home() / ".cache" / "sdrt"))


@functools.lru_cache(maxsize=1)
def core():
    """The process's one openvino.Core (plugins load once)."""
    try:
        import openvino
    except ImportError:
        raise ModelError(f"the openvino backend needs OpenVINO: {INSTALL_HINT}") from None
    return openvino.Core()


def output_name(port) -> str:
    """The graph's name for an output PORT: ONNX output names are the Result's friendly name before '/sink_port'."""
    names = port.get_names()
    friendly = port.get_node().get_friendly_name().rsplit("/sink_port_", 1)[0]
    if friendly in names or not names:
        return friendly
    return sorted(names)[0]


class OpenVINOEngine:
    """One ONNX model compiled by OpenVINO on DEVICE: a compiled model (and its infer request) per input shape.

    PRECISION: the INFERENCE_PRECISION_HINT ("f32", "bf16"; None: the device's default). The graph is read when a
    new shape must be compiled, from a file whose weights OpenVINO maps (openvino_ir.py), and dropped once it is;
    OpenVINO's compiled model keeps that source model, but its mapped pages are given back as the compile reads them
    (mapped.py), so the weights are held once, in the plugin's layout: measured on SD 1.5's UNet, f32 6.70 -> 3.55
    GiB peak, bf16 5.53 -> 2.47 GiB (docs/benchmarks/cpu-memory.md). In bf16 the file is an IR with bf16 MatMul
    weights (openvino_ir.py): from f32 ones the plugin keeps FullyConnected weights at f32 size.
    """

    def __init__(self, model_file: Path, device: str = "CPU", precision: str | None = "f32", threads: int | None = None,
                 cache_dir: Path | None = None, max_shapes: int = MAX_CACHED_SHAPES):  # fmt: skip
        self.model_file = Path(model_file)
        self.device = device
        self.precision = precision
        self.threads = threads or physical_cores()
        self.cache_dir = cache_dir
        self.max_shapes = max_shapes
        self.model = None  # the read (dynamic-shape) ov.Model while one is needed
        self.weight_files: list[Path] = []  # the files OpenVINO maps the source weights from (openvino_ir.py)
        self.compiled = OrderedDict()  # input shapes -> (compiled model, infer request), most recent last
        self.compiles = 0  # models compiled (or imported from the disk cache) so far
        self.input_names: list[str] = []
        self.output_names: list[str] = []

    def config(self) -> dict:
        """compile_model properties: precision, latency over throughput, threads = physical cores, disk cache."""
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if self.precision is not None:
            config["INFERENCE_PRECISION_HINT"] = self.precision
        if self.device == "CPU":
            config.update(INFERENCE_NUM_THREADS=self.threads, NUM_STREAMS=1, ENABLE_HYPER_THREADING=False)
        if self.cache_dir is not None:
            config["CACHE_DIR"] = str(self.cache_dir)
        return config

    def load(self) -> None:
        """Read the ONNX graph (external data included): its input and output names. Compiling waits for a shape."""
        if self.input_names:
            return
        model = self.read()
        self.input_names = [port.get_any_name() for port in model.inputs]
        self.output_names = [output_name(port) for port in model.outputs]

    def read(self):
        """The graph as an ov.Model with its declared (dynamic) shapes, kept until the next compile: read from a
        file whose weights OpenVINO memory-maps (openvino_ir.py: the ONNX file with external data, else its IR)."""
        if self.model is None:
            if not self.model_file.is_file():
                raise ModelError(f"cannot load {str(self.model_file)!r}: no such file")
            try:
                source, self.weight_files = graph_source(self.model_file, cache_root(), core(), self.precision)
                self.model = core().read_model(str(source))
                drop_zero_terms(self.model)  # baddbmm's zeros, a constant of the scores' size once shapes are static
            except ModelError:
                raise
            except Exception as e:  # OpenVINO raises RuntimeError with a multi-line trace for corrupt files
                message = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                why = f"cannot load {str(self.model_file)!r} (truncated or corrupt ONNX file?): {message}"
                raise ModelError(why) from None
        return self.model

    def mapped_files(self) -> list:
        """The weight files OpenVINO maps for this engine: the source's, and the model cache's compiled blobs."""
        blobs = list(Path(self.cache_dir).glob("*.blob")) if self.cache_dir is not None else []
        return [*self.weight_files, *blobs]

    def compiled_for(self, shapes: tuple):
        """(compiled model, infer request) for input SHAPES ((name, shape) pairs), compiling on the first use."""
        if shapes in self.compiled:
            self.compiled.move_to_end(shapes)
            return self.compiled[shapes]
        import openvino

        model = self.read()
        model.reshape({name: openvino.PartialShape(list(shape)) for name, shape in shapes})
        try:
            with ReleasingPages(self.mapped_files):  # the source's pages given back as the compile reads them
                compiled = compile_model(model, self.device, self.config(), self.model_file.name)
        except Exception as e:
            message = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ModelError(f"OpenVINO could not compile {self.model_file} for {self.device}: {message}") from None
        self.model = None  # sdrt's reference to the source graph (the compiled model keeps its constants alive,
        # mapped: ReleasingPages gave their pages back, and they stay out of RSS unless OpenVINO reads them again)
        self.compiles += 1
        while len(self.compiled) >= self.max_shapes:
            self.compiled.popitem(last=False)
        self.compiled[shapes] = (compiled, compiled.create_infer_request())
        return self.compiled[shapes]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.input_names:
            self.load()
        inputs = {name: np.ascontiguousarray(feeds[name]) for name in self.input_names}
        shapes = tuple((name, value.shape) for name, value in inputs.items())
        _, request = self.compiled_for(shapes)
        feeds = {**inputs, **self.weight_feeds()}
        outputs = request.infer(feeds, share_inputs=True, share_outputs=False)  # outputs copied out of the request
        return {name: outputs[i] for i, name in enumerate(self.output_names)}

    def weight_feeds(self) -> dict[str, np.ndarray]:
        """Weights fed as inputs beside the graph's own (OpenVINOWeightsEngine: a LoRA's merged weights); none here."""
        return {}

    def unload(self) -> None:
        self.compiled.clear()
        self.model = None

    @property
    def inference_precision(self) -> str | None:
        """The precision the most recent compiled model runs in, as OpenVINO reports it ('f32', 'bf16')."""
        if not self.compiled:
            return None
        compiled, _ = next(reversed(self.compiled.values()))
        return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def compile_model(model, device: str, config: dict, name: str):
    """core().compile_model, with OpenVINO's disk cache (CONFIG's CACHE_DIR) shared safely by processes.

    OpenVINO writes a blob straight to its final name, and other processes may read it half written. So it compiles
    under the cache folder's lock (a second process waits, then imports the blob the first wrote) in a private
    folder holding hard links to the shared blobs; a blob it writes there is renamed into the shared folder whole.
    A process killed meanwhile leaves only its private folder, which the next holder of the lock removes.
    """
    shared = Path(config["CACHE_DIR"]) if config.get("CACHE_DIR") else None
    if shared is None:
        return core().compile_model(model, device, config)
    try:
        shared.mkdir(parents=True, exist_ok=True)
        with cache_files.entry_lock(shared, f"compiling {name} with OpenVINO"):
            cache_files.remove_leftovers(shared)
            with cache_files.staging_for(shared) as private:
                for blob in shared.iterdir():
                    if blob.is_file():
                        os.link(blob, private / blob.name)
                compiled = core().compile_model(model, device, {**config, "CACHE_DIR": str(private)})
                for blob in private.iterdir():
                    if blob.stat().st_nlink == 1:  # written by this compile
                        os.replace(blob, shared / blob.name)
                shutil.rmtree(private, ignore_errors=True)
        return compiled
    except OSError as e:  # a read-only or full cache folder: compile without the cache
        log.warning("OpenVINO model cache %s not used (%s)", shared, e)
        return core().compile_model(model, device, {k: v for k, v in config.items() if k != "CACHE_DIR"})


def model_cache_dir() -> Path | None:
    """OpenVINO's CACHE_DIR under sdrt's cache folder, keyed by OpenVINO version and CPU (None: SDRT_NO_OV_CACHE)."""
    if os.environ.get("SDRT_NO_OV_CACHE"):
        return None
    import openvino

    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:8]
    return cache_root() / "openvino" / f"{openvino.get_version().split('-')[0]}-{flags}"
