"""Shared fixtures: a tiny random SD pipeline in diffusers format, exported once with `sdrt export`."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# PyTorch's OpenMP threads busy-wait after each op by default; between ONNX Runtime runs on the same 2 cores that
# made each diffusers reference call ~50x slower (0.2 s -> 10 s measured). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# OpenVINO's compiled-model cache (sdrt.engines.openvino) goes to a folder of this run, not the user's ~/.cache/sdrt.
_CACHE = tempfile.mkdtemp(prefix="sdrt-test-cache-")
os.environ.setdefault("SDRT_CACHE", _CACHE)
atexit.register(shutil.rmtree, _CACHE, True)


def pytest_addoption(parser):
    parser.addoption(
        "--sdrt-backend",
        default="cpu",
        help="backend(s) the parity suites' sdrt pipelines run on, comma-separated (cpu, openvino, openvino-bf16, "
        "...); with several, each test runs once per backend",
    )


def pytest_generate_tests(metafunc):
    backends = metafunc.config.getoption("--sdrt-backend").split(",")
    if "backend" in metafunc.fixturenames and len(backends) > 1:
        metafunc.parametrize("backend", backends, scope="session")


@pytest.fixture(scope="session")
def backend(request):
    """The backend the parity suites load sdrt's pipelines on (--sdrt-backend; default cpu, ONNX Runtime)."""
    return getattr(request, "param", None) or request.config.getoption("--sdrt-backend")


# Final latents of the parity suites, max abs difference from diffusers' (values up to ~216): ONNX Runtime measured
# up to 1.1e-3; OpenVINO f32 (each graph within 4e-6 relative of ONNX Runtime, other kernels) up to 2.9e-3.
LATENT_ATOL = {"cpu": 2e-3, "openvino": 4e-3}


@pytest.fixture(scope="session")
def latent_atol(backend):
    """The final-latent tolerance of the parity suites on BACKEND (LATENT_ATOL; images keep 2/255 on every one)."""
    return LATENT_ATOL.get(backend.split("-")[0], LATENT_ATOL["cpu"])


def pytest_collection_modifyitems(config, items):
    try:
        import onnxruntime

        has_gpu = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        has_gpu = False
    from sdrt.engines import tensorrt_available

    has_trt = tensorrt_available()  # tensorrt + cuda-python importable and a CUDA device present
    for item in items:
        if item.get_closest_marker("gpu") is not None and not has_gpu:  # not keywords: ids may say "gpu"
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with onnxruntime-gpu"))
        if item.get_closest_marker("tensorrt") is not None and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT, cuda-python and an NVIDIA GPU (sdrt[tensorrt])"))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """(diffusers pipeline, exported model folder) for a tiny epsilon-prediction SD 1.x model."""
    from tiny_sd import build_tiny_sd

    from sdrt.cli import main

    root = tmp_path_factory.mktemp("tiny_sd")
    pipe = build_tiny_sd(root / "diffusers")
    assert main(["export", str(root / "diffusers"), "-o", str(root / "onnx")]) == 0
    pipe.set_progress_bar_config(disable=True)
    return pipe, root / "onnx"


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_sd, backend):
    from sdrt import Pipeline

    return Pipeline.load(tiny_sd[1], backend=backend)


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    """(diffusers pipeline, exported model folder) for a tiny SD 2-like model: v-prediction, "!" padding, 96 px."""
    from tiny_sd import build_tiny_sd

    from sdrt.cli import main

    root = tmp_path_factory.mktemp("tiny_sd_v")
    pipe = build_tiny_sd(root / "diffusers", seed=1, prediction_type="v_prediction", family="sd2")
    assert main(["export", str(root / "diffusers"), "-o", str(root / "onnx")]) == 0
    pipe.set_progress_bar_config(disable=True)
    return pipe, root / "onnx"


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """(base, refiner) diffusers SDXL pipelines and their exported folders: {"base": (pipe, dir), "refiner": ...}."""
    from tiny_sdxl import build_tiny_sdxl, build_tiny_sdxl_refiner

    from sdrt.cli import main

    root = tmp_path_factory.mktemp("tiny_sdxl")
    base = build_tiny_sdxl(root / "base")
    refiner = build_tiny_sdxl_refiner(root / "refiner", base)
    for name in ("base", "refiner"):
        assert main(["export", str(root / name), "-o", str(root / f"{name}-onnx")]) == 0
    return {"base": (base, root / "base-onnx"), "refiner": (refiner, root / "refiner-onnx")}


@pytest.fixture(scope="session")
def sdrt_server(tiny_sd, tmp_path_factory):
    """`sdrt serve` of the tiny model, a real process on loopback, for the server API and browser tests."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from server_fixture import TEST_SERVER_ARGS, running_server

    with running_server(tiny_sd[1], tmp_path_factory.mktemp("server"), *TEST_SERVER_ARGS) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_inpaint(tmp_path_factory, backend):
    """(diffusers pipeline, sdrt Pipeline) for a tiny 9-channel inpainting UNet, exported with `sdrt export`."""
    from tiny_sd import build_tiny_sd

    from sdrt import Pipeline
    from sdrt.cli import main

    root = tmp_path_factory.mktemp("tiny_inpaint")
    pipe = build_tiny_sd(root / "diffusers", seed=2, unet_in_channels=9)
    assert main(["export", str(root / "diffusers"), "-o", str(root / "onnx")]) == 0
    return pipe, Pipeline.load(root / "onnx", backend=backend)


@pytest.fixture(scope="session")
def tiny_controlnets(tiny_sd, tmp_path_factory):
    """(diffusers pipe, the tiny model exported by `sdrt export --controlnet` (with the `unet_controlnet` variant), two
    tiny ControlNets [(diffusers ControlNetModel, folder exported by `sdrt export-controlnet`)])."""
    from tiny_controlnet import build_tiny_controlnet

    from sdrt.cli import main

    pipe, exported = tiny_sd
    root = tmp_path_factory.mktemp("tiny_controlnet")
    assert main(["export", str(exported.parent / "diffusers"), "-o", str(root / "model"), "--controlnet"]) == 0
    nets = []
    for seed in (0, 1):
        net = build_tiny_controlnet(pipe.unet, root / f"cn{seed}", seed=seed)
        assert main(["export-controlnet", str(root / f"cn{seed}"), "-o", str(root / "controlnets" / f"cn{seed}")]) == 0
        nets.append((net, root / "controlnets" / f"cn{seed}"))
    return pipe, root / "model", nets


@pytest.fixture(scope="session")
def tiny_upscaler_files(tmp_path_factory):
    """{name: file} of tiny random ESRGAN-family upscalers (tiny_upscalers.py)."""
    from tiny_upscalers import write_tiny_upscalers

    return write_tiny_upscalers(tmp_path_factory.mktemp("upscaler-files"))


@pytest.fixture(scope="session")
def tiny_upscalers(tiny_upscaler_files, tmp_path_factory):
    """{name: exported folder} of every tiny upscaler file, all in one folder (an --upscaler-dir)."""
    from sdrt.export.upscaler import export_upscaler

    root = tmp_path_factory.mktemp("upscalers")
    for name, path in tiny_upscaler_files.items():
        export_upscaler(path, root / name)
    return {name: root / name for name in tiny_upscaler_files}
