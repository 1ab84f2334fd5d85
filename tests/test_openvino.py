"""The OpenVINO backend: backend names, precision choice, per-shape compiled models, the disk cache, low-VRAM staging,
and its outputs against ONNX Runtime's on the same graphs (f32) and against its own f32 (bf16, where the CPU has it).

The parity suites themselves run on OpenVINO with `pytest --sdrt-backend openvino` (tests/conftest.py).
"""

import numpy as np
import pytest

import sdrt.engines as engines
import sdrt.engines.openvino as ov_backend
from sdrt.engines import create_engine, resolve_backend
from sdrt.engines.openvino import OpenVINOEngine, OpenVINOTarget, parse_backend, resolve_precision
from sdrt.errors import InvalidOption, ModelError

pytest.importorskip("openvino", reason="the openvino extra is not installed")

needs_bf16 = pytest.mark.skipif(not ov_backend.cpu_has_bf16(), reason=ov_backend.NO_BF16_REASON)
ARGS = dict(width=64, height=64, steps=4, seed=11, cfg_scale=5.0, progress=False)
F32_GRAPH_TOL = 2e-5  # max |OpenVINO - ONNX Runtime| / max |ONNX Runtime|, f32, same inputs (measured: <= 4e-6)
BF16_PSNR_FLOOR = 30.0  # dB, bf16 image against the f32 one on the tiny model (issue 17's floor)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def graph_inputs(name: str, rng) -> dict:
    """Inputs for each tiny graph at a shape the parity tests do not use: (B, ...) float32 / int64."""
    if name == "text_encoder":
        return {"inputs_embeds": rng.standard_normal((2, 77, 32), dtype=np.float32), "eos_index": np.array([5, 9])}
    if name == "unet":
        return {"sample": rng.standard_normal((2, 4, 8, 12), dtype=np.float32),
                "timestep": np.array([900.0, 20.0], np.float32),
                "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}  # fmt: skip
    if name == "vae_decoder":
        return {"latent_sample": rng.standard_normal((1, 4, 8, 12), dtype=np.float32)}
    return {"sample": rng.uniform(-1, 1, (1, 3, 64, 96)).astype(np.float32)}


def relative_errors(model_dir, backend: str) -> dict:
    """{graph: max |BACKEND - ONNX Runtime| / max |ONNX Runtime| over its outputs}, identical inputs."""
    errors = {}
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        feeds = graph_inputs(name, np.random.default_rng(3))
        want = create_engine(model_dir / name / "model.onnx", "cpu").run(feeds)
        got = create_engine(model_dir / name / "model.onnx", backend, keep_f32=False).run(feeds)
        errors[name] = max(float(np.abs(got[k] - want[k]).max() / np.abs(want[k]).max()) for k in want)
    return errors


# ----------------------------------------------------------------------------------------------- names, choice


@pytest.mark.parametrize(
    "name,device,precision,canonical",
    [
        ("openvino", "CPU", "auto", "openvino"),
        ("openvino-f32", "CPU", "f32", "openvino-f32"),
        ("openvino-bf16-cpu", "CPU", "bf16", "openvino-bf16"),
        ("openvino-cpu-auto", "CPU", "auto", "openvino"),
        ("openvino-gpu", "GPU", "auto", "openvino-gpu"),
        ("openvino-gpu.1-f32", "GPU.1", "f32", "openvino-gpu.1-f32"),
        ("openvino-npu", "NPU", "auto", "openvino-npu"),
    ],
)
def test_backend_names(name, device, precision, canonical):
    target = parse_backend(name)
    assert (target.device, target.precision, target.name) == (device, precision, canonical)


@pytest.mark.parametrize("name", ["openvino-fp16", "openvino-gpu-npu", "openvino-f32-bf16", "openvino-", "openvinox"])
def test_bad_backend_names_are_refused_with_the_form(name):
    with pytest.raises(InvalidOption, match=r"backend: got .*; allowed: .*openvino\[-cpu\|-gpu"):
        resolve_backend(name)


def test_auto_precision_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(ov_backend, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert resolve_precision(OpenVINOTarget()) == "bf16"
    monkeypatch.setattr(ov_backend, "cpu_flags", lambda: frozenset({"avx2", "amx_tile", "amx_bf16"}))
    assert resolve_precision(OpenVINOTarget()) == "bf16"
    monkeypatch.setattr(ov_backend, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert resolve_precision(OpenVINOTarget()) == "f32"
    assert resolve_precision(OpenVINOTarget("CPU", "f32")) == "f32"
    with pytest.raises(InvalidOption, match="neither AVX512_BF16 nor AMX"):
        resolve_precision(OpenVINOTarget("CPU", "bf16"))
    assert resolve_precision(OpenVINOTarget("GPU")) is None  # the device's default (f16 on Intel GPUs)
    with pytest.raises(InvalidOption, match="bf16 is for CPUs"):
        resolve_precision(OpenVINOTarget("GPU", "bf16"))


def test_text_encoders_stay_f32_under_bf16(tiny_sd, monkeypatch):
    from sdrt.runtime.manifest import Manifest
    from sdrt.runtime.memory import MemoryPlan

    monkeypatch.setattr(ov_backend, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    built = MemoryPlan().create_engines(Manifest.load(tiny_sd[1]), "openvino")  # nothing compiles yet
    assert {name: e.precision for name, e in built.items()} == {
        "text_encoder": "f32", "unet": "bf16", "vae_decoder": "bf16", "vae_encoder": "bf16"}  # fmt: skip


def test_auto_picks_openvino_on_a_bf16_cpu_without_an_nvidia_gpu_and_says_so(monkeypatch, capsys, tmp_path):
    """The rest of auto's table: tests/test_auto_backend.py."""
    import sdrt.engines.auto as auto

    monkeypatch.setattr(auto, "_said", set())
    monkeypatch.setattr(engines, "tensorrt_available", lambda: False)
    monkeypatch.setattr(engines, "cuda_available", lambda: False)
    monkeypatch.setattr(auto, "openvino_devices", lambda: ("CPU",))
    monkeypatch.setattr(ov_backend, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert resolve_backend("auto", tmp_path) == "openvino"
    err = capsys.readouterr().err
    assert "backend auto -> openvino" in err and "sdrt: backend openvino: OpenVINO on CPU, bf16" in err
    assert resolve_backend("auto", tmp_path, new_weights=True) == "openvino"  # LoRAs: measured faster in bf16
    assert "OpenVINO bf16's LoRA steps measured 0.72x ONNX Runtime's" in capsys.readouterr().err
    monkeypatch.setattr(ov_backend, "cpu_flags", lambda: frozenset({"avx2"}))
    assert resolve_backend("auto", tmp_path, new_weights=True) == "cpu"  # f32: OpenVINO's LoRA steps are slower
    assert "OpenVINO: its LoRA steps run the merged weights as inputs, f32" in capsys.readouterr().err
    monkeypatch.setattr(ov_backend, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    monkeypatch.setattr(auto, "openvino_available", lambda: False)
    assert resolve_backend("auto", tmp_path) == "cpu"
    assert "OpenVINO: not installed (pip install 'sdrt[openvino]')" in capsys.readouterr().err


def test_without_openvino_the_backend_is_one_clear_error(tiny_sd, monkeypatch):
    monkeypatch.setattr(ov_backend, "openvino_available", lambda: False)
    with pytest.raises(ModelError, match=r"needs OpenVINO: pip install 'sdrt\[openvino\]'"):
        create_engine(tiny_sd[1] / "unet" / "model.onnx", "openvino")


def test_cli_bf16_on_a_cpu_without_it_exits_2(tiny_sd, capsys, monkeypatch):
    from sdrt.cli import main

    monkeypatch.setattr(ov_backend, "cpu_flags", lambda: frozenset({"avx2"}))
    assert main(["generate", "a cat", "-m", str(tiny_sd[1]), "--backend", "openvino-bf16", "--steps", "1"]) == 2
    assert "backend: got 'openvino-bf16'; allowed: openvino or openvino-f32 on this CPU" in capsys.readouterr().err


def test_corrupt_model_is_a_model_error(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelError, match="truncated or corrupt ONNX file"):
        OpenVINOEngine(tmp_path / "model.onnx").load()


# ----------------------------------------------------------------------------------------------- f32 outputs


def test_f32_graphs_match_onnx_runtime(tiny_sd):
    errors = relative_errors(tiny_sd[1], "openvino-f32")
    assert max(errors.values()) <= F32_GRAPH_TOL, errors


def test_graph_comparison_can_fail(tiny_sd):
    """The tolerance above is tight enough to see one input off by 0.1%."""
    feeds = graph_inputs("unet", np.random.default_rng(3))
    want = create_engine(tiny_sd[1] / "unet" / "model.onnx", "cpu").run(feeds)["out_sample"]
    feeds["sample"] = feeds["sample"] * 1.001
    got = create_engine(tiny_sd[1] / "unet" / "model.onnx", "openvino-f32").run(feeds)["out_sample"]
    assert np.abs(got - want).max() / np.abs(want).max() > 10 * F32_GRAPH_TOL


# ----------------------------------------------------------------------------------------------- shapes, memory


def test_one_compiled_model_per_shape_and_the_source_graph_released(tiny_sd, tmp_path):
    engine = OpenVINOEngine(tiny_sd[1] / "vae_decoder" / "model.onnx", cache_dir=tmp_path, max_shapes=2)
    engine.load()
    assert engine.output_names == ["sample"] and engine.input_names == ["latent_sample"]
    rng = np.random.default_rng(0)
    small, wide, tall = (rng.standard_normal((1, 4, h, w), dtype=np.float32) for h, w in ((8, 8), (8, 16), (16, 8)))
    first = engine.run({"latent_sample": small})["sample"]  # (1, 3, 64, 64)
    assert engine.model is None  # sdrt holds no reference to the source graph once compiled
    assert engine.run({"latent_sample": wide})["sample"].shape == (1, 3, 64, 128)
    assert engine.compiles == 2
    np.testing.assert_array_equal(engine.run({"latent_sample": small})["sample"], first)  # cached, same result
    assert engine.compiles == 2
    engine.run({"latent_sample": tall})  # a third shape evicts the least recently used one (wide)
    assert engine.compiles == 3 and len(engine.compiled) == 2
    engine.run({"latent_sample": wide})
    assert engine.compiles == 4
    assert any(tmp_path.iterdir())  # OpenVINO's model cache
    fresh = OpenVINOEngine(tiny_sd[1] / "vae_decoder" / "model.onnx", cache_dir=tmp_path)
    np.testing.assert_array_equal(fresh.run({"latent_sample": small})["sample"], first)
    compiled, _ = fresh.compiled[next(iter(fresh.compiled))]
    assert compiled.get_property("LOADED_FROM_CACHE")  # a second load imports, no compile


def test_engine_options_threads_and_precision(tiny_sd):
    engine = create_engine(tiny_sd[1] / "vae_decoder" / "model.onnx", "openvino-f32")
    engine.run({"latent_sample": np.zeros((1, 4, 8, 8), np.float32)})
    compiled, _ = next(iter(engine.compiled.values()))
    assert compiled.get_property("INFERENCE_NUM_THREADS") == engine.threads == ov_backend.physical_cores()
    assert engine.inference_precision == "f32"
    assert str(compiled.get_property("PERFORMANCE_HINT")).endswith("LATENCY")


def test_low_vram_staging_gives_the_same_image(tiny_sd):
    from sdrt import Pipeline

    resident = Pipeline.load(tiny_sd[1], backend="openvino-f32")
    staged = Pipeline.load(tiny_sd[1], backend="openvino-f32", low_vram=True)
    want = np.asarray(resident.generate("a photo of a cat", **ARGS)[0])
    got = np.asarray(staged.generate("a photo of a cat", **ARGS)[0])
    np.testing.assert_array_equal(got, want)
    held = [name for name, e in staged.engines.items() if e.inner.compiled or e.inner.model is not None]
    assert held == ["vae_decoder"]  # the last stage only; the others were unloaded when it ran
    assert staged.engines["unet"].stager.loads == 3


# ----------------------------------------------------------------------------------------------- bf16


@needs_bf16
def test_bf16_graph_errors_and_image_psnr(tiny_sd, capsys):
    """bf16 per graph against ONNX Runtime f32 on identical inputs, and the image against OpenVINO f32's."""
    from sdrt import Pipeline

    errors = relative_errors(tiny_sd[1], "openvino-bf16")
    with capsys.disabled():
        print(f"\nbf16 relative error per graph: {errors}")
    assert max(errors.values()) < 0.1, errors  # bf16 keeps 8 bits of mantissa: ~1e-2 after a few layers
    f32 = np.asarray(Pipeline.load(tiny_sd[1], backend="openvino-f32").generate("a photo of a cat", **ARGS)[0])
    bf16_pipe = Pipeline.load(tiny_sd[1], backend="openvino-bf16")
    bf16 = np.asarray(bf16_pipe.generate("a photo of a cat", **ARGS)[0])
    assert bf16_pipe.engines["unet"].inference_precision == "bf16"
    assert bf16_pipe.engines["text_encoder"].inference_precision == "f32"
    value = psnr(bf16, f32)
    with capsys.disabled():
        print(f"bf16 vs f32 image PSNR: {value:.1f} dB")
    assert value >= BF16_PSNR_FLOOR
    other_seed = np.asarray(bf16_pipe.generate("a photo of a cat", **{**ARGS, "seed": 12})[0])
    assert psnr(other_seed, f32) < BF16_PSNR_FLOOR  # can fail: another seed's image is far below the floor


# ----------------------------------------------------------------------------------------------- benchmark


def test_bench_runs_sdrt_on_openvino_and_says_what_it_cannot_run(tiny_sd, tmp_path, monkeypatch):
    from sdrt.bench import cpu_runtimes
    from sdrt.bench.cpu import worker_sdrt

    job = {"onnx_dir": str(tiny_sd[1]), "out_dir": str(tmp_path), "width": 64, "height": 64, "steps": 2, "runs": 1,
           "seed": 3, "latent_channels": 4, "context_dim": 32, "text_max_length": 77}  # fmt: skip
    _, extra, _ = cpu_runtimes.CPU_RUNTIMES["sdrt_openvino_f32"]
    monkeypatch.setenv("SDRT_NO_OV_CACHE", "")  # the worker sets it from the job; restored after the test
    result = worker_sdrt({**job, **extra, "label": "sdrt_openvino_f32"})
    assert result["backend"] == "openvino-f32" and result["inference_precision"]["unet"] == "f32"
    monkeypatch.setattr(ov_backend, "cpu_flags", lambda: frozenset({"avx2"}))
    assert cpu_runtimes.why_not("sdrt_openvino_bf16") == ov_backend.NO_BF16_REASON
    monkeypatch.setenv("SDRT_OVPEER_PYTHON", str(tmp_path / "missing" / "python"))
    assert "make-ovpeer-venv.sh" in cpu_runtimes.why_not("optimum_intel_f32")
    measured = {"sdrt_openvino_f32": {**result, "peak_rss_bytes": 2**30}}
    table = cpu_runtimes.runtimes_table(measured, {}, {"sdrt_openvino_bf16": ov_backend.NO_BF16_REASON})
    assert "| sdrt, OpenVINO | f32 |" in table and "| sdrt, OpenVINO | bf16 | not run: this CPU has" in table


def test_loras_on_openvino_are_merged(tiny_sd, tmp_path):
    """OpenVINO engines take LoRAs (engines/openvino_weights.py; parity in tests/test_lora_openvino.py): the weight
    a LoRA changes is an input of the compiled UNet, fed base + the LoRA's terms."""
    from tiny_lora import one_layer_lora

    from sdrt import Pipeline
    from sdrt.runtime.lora import parse_prompt

    one_layer_lora(tiny_sd[1], tmp_path / "one.safetensors")
    pipe = Pipeline.load(tiny_sd[1], backend="openvino-f32", loras=tmp_path)
    pipe.loras.apply(parse_prompt("<lora:one:1>")[1])
    unet = pipe.engines["unet"].replaceable
    changed = [name for name, value in unet.current.items() if value is not unet.base[name]]
    assert len(changed) == 1
