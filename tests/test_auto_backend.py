"""What backend="auto" picks without an NVIDIA GPU (engines/auto.py), with the CPU's flags and OpenVINO's devices
mocked: OpenVINO where it is faster at the same or lower memory (bf16 CPUs, Intel GPUs/NPUs), ONNX Runtime CPU
elsewhere; the choice and its reason said once; an explicit backend always wins."""

import pytest

import sdrt.engines as engines
import sdrt.engines.auto as auto
import sdrt.engines.openvino as ov_backend
from sdrt.engines import resolve_backend

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})  # most laptops
AVX512_BF16 = AVX2 | {"avx512f", "avx512_bf16"}  # AMD Zen 4, Intel Cooper Lake
AMX = AVX2 | {"avx512f", "amx_tile", "amx_bf16"}  # Intel Sapphire Rapids and later
OPENVINO_DEVICES = auto.openvino_devices  # the real query (the fixture mocks it)


@pytest.fixture
def machine(monkeypatch):
    """set(flags=..., devices=..., openvino=...): a machine without an NVIDIA GPU, as auto.py sees it."""
    monkeypatch.setattr(auto, "_said", set())
    monkeypatch.setattr(engines, "tensorrt_available", lambda: False)
    monkeypatch.setattr(engines, "cuda_available", lambda: False)

    def set_machine(flags=AVX2, devices=("CPU",), openvino=True):
        monkeypatch.setattr(ov_backend, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(auto, "openvino_devices", lambda: tuple(devices))
        monkeypatch.setattr(auto, "openvino_available", lambda: openvino)
        monkeypatch.setattr(ov_backend, "openvino_available", lambda: openvino)

    set_machine()
    return set_machine


@pytest.mark.parametrize(
    "flags,devices,openvino,new_weights,want",
    [
        (AVX2, ("CPU",), True, False, "cpu"),  # OpenVINO f32 is no faster than ONNX Runtime: ONNX Runtime
        (AVX512_BF16, ("CPU",), True, False, "openvino"),  # bf16: faster, half the weight bytes
        (AMX, ("CPU",), True, False, "openvino"),
        (AVX2, ("CPU", "GPU"), True, False, "openvino-gpu"),  # an Intel GPU
        (AVX2, ("CPU", "GPU.0", "GPU.1"), True, False, "openvino-gpu"),
        (AMX, ("CPU", "NPU"), True, False, "openvino-npu"),
        (AVX2, ("CPU", "GPU", "NPU"), True, False, "openvino-gpu"),  # the GPU first
        (AMX, ("CPU", "GPU"), True, True, "openvino"),  # LoRAs: bf16 LoRA steps measured faster; GPU unmeasured
        (AVX2, ("CPU", "GPU"), True, True, "cpu"),  # LoRAs in f32: OpenVINO's steps slower
        (AMX, ("CPU",), False, False, "cpu"),  # OpenVINO not installed
    ],
)
def test_auto_picks_by_the_table(machine, flags, devices, openvino, new_weights, want):
    machine(flags=flags, devices=devices, openvino=openvino)
    assert resolve_backend("auto", announce=False, new_weights=new_weights) == want


def test_the_choice_and_its_reason_are_said_once(machine, capsys):
    machine(flags=AVX2)
    assert resolve_backend("auto") == "cpu"
    assert resolve_backend("auto") == "cpu"  # a second pipeline (a server loading another model): said once
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["sdrt: backend auto -> cpu (TensorRT: tensorrt/cuda-python or a GPU missing; CUDA: "
                     "onnxruntime-gpu's CUDAExecutionProvider missing; the CPU has no AVX512_BF16 or AMX: OpenVINO "
                     "would run f32, no faster than ONNX Runtime)"]  # fmt: skip
    machine(flags=AVX512_BF16)
    assert resolve_backend("auto") == "openvino"
    err = capsys.readouterr().err
    assert "backend auto -> openvino (" in err and "the CPU has AVX512_BF16 or AMX: OpenVINO bf16" in err
    assert "sdrt: backend openvino: OpenVINO on CPU, bf16, text encoder f32" in err


def test_an_explicit_backend_always_wins(machine, monkeypatch, capsys):
    machine(flags=AMX, devices=("CPU", "GPU"))  # auto would pick OpenVINO on the GPU
    assert resolve_backend("cpu") == "cpu"
    assert resolve_backend("openvino-f32") == "openvino-f32"
    machine(flags=AVX2)  # auto would pick ONNX Runtime
    assert resolve_backend("openvino") == "openvino"
    monkeypatch.setattr(engines, "cuda_available", lambda: True)
    assert resolve_backend("cpu") == "cpu" and resolve_backend("auto", announce=False) == "cuda"
    assert "backend auto" not in capsys.readouterr().err.split("cuda")[0]  # explicit ones say no "auto" line


def test_a_broken_openvino_device_query_leaves_the_cpu_rule(machine, monkeypatch):
    machine(flags=AVX2)
    monkeypatch.setattr(auto, "openvino_devices", OPENVINO_DEVICES)

    def broken():
        raise RuntimeError("GPU plugin: cannot load OpenCL")

    monkeypatch.setattr(ov_backend, "core", broken)
    assert auto.openvino_devices() == ()
    assert resolve_backend("auto", announce=False) == "cpu"


def test_pipeline_on_auto_runs_onnx_runtime_on_an_avx2_cpu(machine, tiny_sd):
    from sdrt import Pipeline
    from sdrt.engines.onnxruntime import OnnxRuntimeEngine
    from sdrt.engines.openvino import OpenVINOEngine

    machine(flags=AVX2)
    pipe = Pipeline.load(tiny_sd[1], backend="auto")
    assert pipe.backend == "cpu" and isinstance(pipe.engines["unet"], OnnxRuntimeEngine)
    machine(flags=AVX512_BF16)  # can fail: the same call on a bf16 CPU gives OpenVINO engines
    assert isinstance(Pipeline.load(tiny_sd[1], backend="auto").engines["unet"], OpenVINOEngine)
