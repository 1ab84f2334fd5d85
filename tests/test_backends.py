"""Backend selection ("auto" -> TensorRT > CUDA > OpenVINO > CPU), the CUDA engine's I/O-binding path, refusals."""

import json
import shutil
import sys
import types

import numpy as np
import pytest

import sdrt.engines as engines
from sdrt.engines import create_engine, resolve_backend
from sdrt.engines.engine_files import EngineIdentity, source_fingerprint
from sdrt.engines.onnxruntime import OnnxRuntimeEngine
from sdrt.engines.plan import ShapeRanges, plan_profile
from sdrt.runtime.errors import InvalidOption, ModelError, SdrtError


def test_auto_falls_back_to_cpu_and_says_why(monkeypatch, capsys, tmp_path):
    import sdrt.engines.openvino as ov_backend

    monkeypatch.setattr(engines, "tensorrt_available", lambda: False)
    monkeypatch.setattr(engines, "cuda_available", lambda: False)
    monkeypatch.setattr(ov_backend, "openvino_available", lambda: False)  # with it, auto picks OpenVINO (its tests)
    assert resolve_backend("auto", tmp_path) == "cpu"
    err = capsys.readouterr().err
    assert "backend auto -> cpu" in err and "TensorRT" in err and "CUDA" in err and "OpenVINO" in err


def test_auto_picks_cuda_without_tensorrt_engines(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(engines, "tensorrt_available", lambda: True)
    monkeypatch.setattr(engines, "cuda_available", lambda: True)
    assert resolve_backend("auto", tmp_path) == "cuda"
    assert f"no engines built (sdrt build {tmp_path})" in capsys.readouterr().err


def test_auto_picks_tensorrt_when_engines_are_built(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(engines, "tensorrt_available", lambda: True)
    (tmp_path / "engines" / "unet").mkdir(parents=True)
    (tmp_path / "engines" / "unet" / "0123.json").write_text("{}")
    assert resolve_backend("auto", tmp_path) == "tensorrt"
    assert "backend auto -> tensorrt" in capsys.readouterr().err


def test_explicit_backends_pass_and_unknown_ones_are_refused():
    assert resolve_backend("cpu") == "cpu" and resolve_backend("tensorrt") == "tensorrt"
    with pytest.raises(InvalidOption, match="backend: got 'gpu'; allowed: auto, cpu, cuda, tensorrt"):
        resolve_backend("gpu")


def test_cuda_engine_is_configured_for_the_cuda_provider(tmp_path):
    engine = create_engine(tmp_path / "model.onnx", "cuda", gpu_mem_limit=2**31)
    assert isinstance(engine, OnnxRuntimeEngine) and engine.device == "cuda" and engine.io_binding
    name, options = engine.providers[0]
    assert name == "CUDAExecutionProvider" and options["gpu_mem_limit"] == 2**31
    assert options["arena_extend_strategy"] == "kSameAsRequested"
    assert engine.providers[-1] == "CPUExecutionProvider"


def test_io_binding_path_matches_session_run(tiny_sd, tmp_path):
    """The CUDA backend's I/O-binding code, run on the CPU device: the same outputs as session.run."""
    import onnxruntime as ort

    model = tiny_sd[1] / "vae_decoder" / "model.onnx"
    plain = OnnxRuntimeEngine(model, ["CPUExecutionProvider"])
    bound = OnnxRuntimeEngine(model, ["CPUExecutionProvider"])
    bound.io_binding = True
    z = np.random.default_rng(0).standard_normal((1, 4, 8, 12)).astype(np.float32)  # (1, 4, h, w)
    want = plain.run({"latent_sample": z})["sample"]
    np.testing.assert_array_equal(bound.run({"latent_sample": z})["sample"], want)
    on_device = ort.OrtValue.ortvalue_from_numpy(z, "cpu", 0)  # a value already on the engine's device
    np.testing.assert_array_equal(bound.run({"latent_sample": on_device})["sample"], want)


def test_tensorrt_backend_without_tensorrt_is_one_clear_error(tiny_sd, monkeypatch):
    from sdrt import Pipeline

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails, as on a machine without it
    with pytest.raises(SdrtError, match=r"needs TensorRT and cuda-python: pip install 'sdrt\[tensorrt\]'"):
        Pipeline.load(tiny_sd[1], backend="tensorrt")


def test_cli_bad_backend_exits_2(tiny_sd, capsys):
    from sdrt.cli import main

    assert main(["generate", "a cat", "-m", str(tiny_sd[1]), "--backend", "gpu", "--steps", "1"]) == 2
    assert "backend: got 'gpu'" in capsys.readouterr().err


def fake_engine(model_dir, name, compute_capability, trt_version, source_hash=None):
    """An engine's metadata file (no engine content is read before the checks refuse it)."""
    inputs = json.loads((model_dir / "model.json").read_text())["models"][name]["inputs"]
    identity = EngineIdentity(
        model=name,
        compute_capability=compute_capability,
        trt_version=trt_version,
        precision="fp16",
        profile=plan_profile(name, inputs, ShapeRanges(), 8),
        source_hash=source_hash or source_fingerprint(model_dir / name / "model.onnx"),
    )
    folder = model_dir / "engines" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{identity.key()}.json").write_text(json.dumps({"identity": identity.to_json()}))
    (folder / f"{identity.key()}.plan").write_bytes(b"not an engine")
    return identity


def test_engine_built_for_another_gpu_is_never_loaded(tiny_sd, tmp_path, monkeypatch):
    """TensorRTEngine.load refuses, before deserializing, an engine of another GPU generation or TensorRT."""
    import sdrt.engines.tensorrt as trt_backend

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_sd[1], model_dir, ignore=shutil.ignore_patterns(".ort-cache"))
    fake_engine(model_dir, "unet", "8.6", "10.8.0")
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.8.0"))
    monkeypatch.setattr(trt_backend, "compute_capability", lambda device=0: "9.0")
    engine = trt_backend.TensorRTEngine(model_dir / "unet" / "model.onnx")
    with pytest.raises(ModelError) as e:
        engine.load()
    assert "compute capability 8.6, this GPU is 9.0" in str(e.value)
    assert f"sdrt build {model_dir}" in str(e.value)
    monkeypatch.setattr(trt_backend, "compute_capability", lambda device=0: "8.6")
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.9.1"))
    with pytest.raises(ModelError, match="TensorRT 10.8.0, this is TensorRT 10.9.1"):
        trt_backend.TensorRTEngine(model_dir / "unet" / "model.onnx").load()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--height", "300:512:1024"], "height: got (300, 512, 1024)"),  # not a multiple of 8
        (["--static", "512"], "--static: got '512'; allowed: WIDTHxHEIGHT"),
        (["--models", "unet,refiner"], "--models: got 'refiner'"),
        (["--builder-workspace", "lots"], "--builder-workspace: got 'lots'"),
        ([], "`sdrt build` needs TensorRT: pip install 'sdrt[tensorrt]'"),  # valid input, no TensorRT here
    ],
)
def test_build_bad_input_and_missing_tensorrt_exit_2(tiny_sd, monkeypatch, capsys, argv, message):
    from sdrt.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["build", str(tiny_sd[1]), *argv]) == 2
    assert message in capsys.readouterr().err
