"""Backends behind one small seam: load, run(feeds) -> outputs named as in the ONNX graph, unload."""

import importlib.util
from pathlib import Path
from typing import Protocol

import numpy as np

BACKENDS = ("auto", "cpu", "cuda", "tensorrt", "openvino")  # "openvino" also takes -DEVICE / -PRECISION parts


class Engine(Protocol):
    input_names: list[str]
    output_names: list[str]

    def load(self) -> None: ...

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def unload(self) -> None: ...


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
    """BACKEND itself (a user's explicit backend always wins), or for "auto" the fastest one present: TensorRT (with
    engines built for MODEL_DIR), then ONNX Runtime CUDA, then what engines/auto.py picks without an NVIDIA GPU
    (OpenVINO where it is faster at the same or lower memory, not with NEW_WEIGHTS: LoRAs; else ONNX Runtime CPU);
    says which and why on stderr, once per process (and how OpenVINO runs)."""
    from sdrt.engines.auto import announce as say
    from sdrt.engines.auto import choose_without_nvidia
    from sdrt.engines.openvino import BACKEND_FORM, describe, is_openvino_backend, parse_backend
    from sdrt.errors import InvalidOption

    if is_openvino_backend(backend):
        name = parse_backend(backend).name  # validates; "openvino-cpu-auto" -> "openvino"
        how = describe(parse_backend(name))  # also refuses bf16 on a CPU without it
        if announce:
            say(f"sdrt: backend {name}: OpenVINO on {how}")
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
        chosen = "cuda" if cuda_available() else None
        if chosen is None:
            reasons.append("CUDA: onnxruntime-gpu's CUDAExecutionProvider missing")
            choice = choose_without_nvidia(new_weights)
            chosen = choice.backend
            reasons.append(choice.reason)
    if announce:
        say(f"sdrt: backend auto -> {chosen}" + (f" ({'; '.join(reasons)})" if reasons else ""))
        if is_openvino_backend(chosen):
            say(f"sdrt: backend {chosen}: OpenVINO on {describe(parse_backend(chosen))}")
    return chosen


def create_engine(model_file: Path, backend: str, **options) -> Engine:
    """An unloaded engine for MODEL_FILE on BACKEND ("cpu", "cuda" or "tensorrt"; resolve "auto" first).

    OPTIONS: for "cuda", `gpu_mem_limit` (bytes), `device_id`, `static_dims` ({axis: size}, a static profile) and
    `cuda_graph` (capture and replay, with static_dims); for "cpu", `static_dims`; for "tensorrt", `workspace` (a shared
    tensorrt.Workspace) and `streaming_budget` (bytes of weights kept on the GPU); for "openvino...", `keep_f32`.
    """
    from sdrt.engines.openvino import is_openvino_backend
    from sdrt.errors import InvalidOption

    if is_openvino_backend(backend):
        from sdrt.engines.openvino import create_openvino_engine

        return create_openvino_engine(model_file, backend, **options)

    if backend == "cpu":
        from sdrt.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(model_file, providers=["CPUExecutionProvider"], static_dims=options.get("static_dims"))
    if backend == "cuda":
        from sdrt.engines.onnxruntime import OnnxRuntimeEngine
        from sdrt.engines.ort_binding import cuda_providers

        static, graph = options.pop("static_dims", None), options.pop("cuda_graph", False)
        providers = cuda_providers(**options, static=bool(static), cuda_graph=graph)
        return OnnxRuntimeEngine(model_file, providers=providers, device="cuda", static_dims=static, cuda_graph=graph)
    if backend == "tensorrt":
        from sdrt.engines.tensorrt import TensorRTEngine

        return TensorRTEngine(model_file, **options)
    raise InvalidOption("backend", backend, ", ".join(b for b in BACKENDS if b != "auto") + " (auto: resolve first)")
