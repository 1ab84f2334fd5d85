"""Backends behind one small seam: load, run(feeds) -> outputs named as in the ONNX graph, unload; what else an
engine can do is declared by its Capabilities (capabilities.py), which the runtime asks instead of its name."""

import importlib.util
import sys
from pathlib import Path
from typing import Protocol

import numpy as np

from sdrt.engines.capabilities import Capabilities, capabilities

BACKENDS = ("auto", "cpu", "cuda", "tensorrt", "openvino")  # "openvino" also takes -DEVICE / -PRECISION parts


class Engine(Protocol):
    """One graph on one backend. Every engine has the first group; the second exists where its Capabilities say."""

    input_names: list[str]
    output_names: list[str]
    capabilities: Capabilities  # what the engine can do (set by create_engine from its backend)
    model_file: Path  # the graph it runs: the export's model.onnx or a fused variant of it

    def load(self) -> None: ...

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def unload(self) -> None: ...

    # capabilities.replaceable_weights: weights read and replaced in place (LoRAs), by initializer name
    def read_weights(self, names) -> dict[str, np.ndarray]: ...

    def set_weights(self, weights: dict[str, np.ndarray]) -> None: ...

    def merge_weights(self, updates: dict[str, list]) -> None: ...

    # capabilities.device_outputs: outputs that stay on the device between calls (I/O binding)
    def prepare(self, input_shapes: dict): ...

    def run_device(self, feeds: dict) -> dict: ...


def tensorrt_available() -> bool:
    """tensorrt and cuda-python importable and a CUDA device present (nothing is imported to find out but cudart)."""
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("cuda") is None:
        return False
    try:
        from sdrt.engines.tensorrt import device_count

        return device_count() > 0
    except Exception:  # a broken CUDA install: not available
        return False


def cuda_available() -> bool:
    """ONNX Runtime built with the CUDA execution provider (onnxruntime-gpu)."""
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def resolve_backend(
    backend: str, model_dir: Path | None = None, announce: bool = True, new_weights: bool = False
) -> str:
    """BACKEND itself, or for "auto" the fastest one present: TensorRT (with engines built for MODEL_DIR),
    then ONNX Runtime CUDA, then OpenVINO (not with NEW_WEIGHTS: engines that must take new weights, for LoRAs),
    then ONNX Runtime CPU; says which on stderr (and how OpenVINO runs)."""
    from sdrt.engines.openvino import BACKEND_FORM, is_openvino_backend, openvino_available, parse_backend
    from sdrt.errors import InvalidOption

    if is_openvino_backend(backend):
        name = parse_backend(backend).name  # validates; "openvino-cpu-auto" -> "openvino"
        if announce:
            from sdrt.engines.openvino import announce as announce_openvino

            announce_openvino(name)  # also refuses bf16 on a CPU without it
        return name
    if backend not in BACKENDS:
        raise InvalidOption("backend", backend, ", ".join(BACKENDS[:-1]) + ", " + BACKEND_FORM)
    if backend != "auto":
        return backend
    reasons = []
    if not tensorrt_available():
        reasons.append("TensorRT: tensorrt/cuda-python or a GPU missing")
    elif model_dir is not None and not any((Path(model_dir) / "engines").glob("*/*.json")):
        reasons.append(f"TensorRT: no engines built (sdrt build {model_dir})")
    else:
        chosen = "tensorrt"
    if reasons:
        openvino = openvino_available() and not new_weights
        chosen = "cuda" if cuda_available() else "openvino" if openvino else "cpu"
        if chosen != "cuda":
            reasons.append("CUDA: onnxruntime-gpu's CUDAExecutionProvider missing")
        if chosen == "cpu":
            reasons.append("OpenVINO: its engines take no new weights (LoRAs)" if new_weights and openvino_available()
                           else "OpenVINO: not installed (pip install 'sdrt[openvino]')")  # fmt: skip
    if announce:
        print(f"sdrt: backend auto -> {chosen}" + (f" ({'; '.join(reasons)})" if reasons else ""), file=sys.stderr)
        if chosen == "openvino":
            from sdrt.engines.openvino import announce as announce_openvino

            announce_openvino(chosen)
    return chosen


def create_engine(model_file: Path, backend: str, **options) -> Engine:
    """An unloaded engine for MODEL_FILE on BACKEND ("cpu", "cuda" or "tensorrt"; resolve "auto" first).

    OPTIONS: for "cuda", `gpu_mem_limit` (bytes), `device_id`, `static_dims` ({axis: size}, a static profile) and
    `cuda_graph` (capture and replay, with static_dims); for "cpu", `static_dims`; for "tensorrt", `workspace` (a shared
    tensorrt.Workspace) and `streaming_budget` (bytes of weights kept on the GPU); for "openvino...", `keep_f32`.
    """
    caps = capabilities(backend)  # InvalidOption for an unknown (or unresolved "auto") backend
    engine = _ENGINE_FACTORIES[backend.split("-")[0]](model_file, backend, options)
    engine.capabilities = caps
    return engine


def _openvino(model_file: Path, backend: str, options: dict) -> Engine:
    from sdrt.engines.openvino import create_openvino_engine

    return create_openvino_engine(model_file, backend, **options)


def _ort_cpu(model_file: Path, backend: str, options: dict) -> Engine:
    from sdrt.engines.onnxruntime import OnnxRuntimeEngine

    return OnnxRuntimeEngine(model_file, providers=["CPUExecutionProvider"], static_dims=options.get("static_dims"))


def _ort_cuda(model_file: Path, backend: str, options: dict) -> Engine:
    from sdrt.engines.onnxruntime import OnnxRuntimeEngine
    from sdrt.engines.ort_binding import cuda_providers

    static, graph = options.pop("static_dims", None), options.pop("cuda_graph", False)
    providers = cuda_providers(**options, static=bool(static), cuda_graph=graph)
    return OnnxRuntimeEngine(model_file, providers=providers, device="cuda", static_dims=static, cuda_graph=graph)


def _tensorrt(model_file: Path, backend: str, options: dict) -> Engine:
    from sdrt.engines.tensorrt import TensorRTEngine

    return TensorRTEngine(model_file, **options)


# Each backend's engine factory (model file, backend string, options) -> Engine; its Capabilities: capabilities.py.
_ENGINE_FACTORIES = {"cpu": _ort_cpu, "cuda": _ort_cuda, "tensorrt": _tensorrt, "openvino": _openvino}
