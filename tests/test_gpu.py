"""GPU backends on the tiny model: ONNX Runtime CUDA (marked gpu) and TensorRT (marked tensorrt).

Skipped without the hardware and libraries (conftest.py). NOT YET RUN: no GPU was lent to the session that wrote
them. Run with `pytest -m "gpu or tensorrt" tests/test_gpu.py` on a machine with an NVIDIA GPU.
Tolerances: the same model and noise on fp16 kernels vs the CPU's fp32 run differ by rounding only; 4/255 covers
fp16 accumulation in the tiny UNet over a few steps (to be confirmed on the first GPU run).
"""

import numpy as np
import pytest

FP16_TOLERANCE_255 = 4
SIZES = [(64, 64), (96, 64), (128, 128)]  # inside the dynamic profile below, away from its optimum (64x64)
ARGS = dict(steps=4, seed=11, cfg_scale=6.0, progress=False)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)  # (B, H, W, 3)


@pytest.fixture(scope="module")
def cpu_images(tiny_sd):
    from sdrt import Pipeline

    pipe = Pipeline.load(tiny_sd[1])
    return {size: pixels(pipe.generate("a photo of a cat", width=size[0], height=size[1], **ARGS)) for size in SIZES}


@pytest.mark.gpu
@pytest.mark.parametrize("size", SIZES)
def test_cuda_backend_matches_the_cpu(tiny_sd, cpu_images, size):
    from sdrt import Pipeline

    pipe = Pipeline.load(tiny_sd[1], backend="cuda")
    got = pixels(pipe.generate("a photo of a cat", width=size[0], height=size[1], **ARGS))
    assert np.abs(got - cpu_images[size]).max() <= FP16_TOLERANCE_255


@pytest.mark.gpu
def test_cuda_budget_is_kept(tiny_sd):
    from sdrt import Pipeline
    from sdrt.bench.gpu_workers import VramMonitor

    monitor = VramMonitor()
    pipe = Pipeline.load(tiny_sd[1], backend="cuda", vram_budget="512MB")
    pipe.generate("a cat", width=128, height=128, **ARGS)
    assert monitor.stop() <= 512 * 2**20 + 400 * 2**20  # the budget plus the CUDA context, outside ORT's arena


@pytest.fixture(scope="module")
def trt_model(tiny_sd, tmp_path_factory):
    """The tiny model with a dynamic engine (64..128 px, batch 1..2) and a static 64x64 one."""
    import shutil

    from sdrt.engines.plan import ShapeRanges
    from sdrt.export.build_trt import build

    folder = tmp_path_factory.mktemp("trt") / "model"
    shutil.copytree(tiny_sd[1], folder, ignore=shutil.ignore_patterns(".ort-cache"))
    build(folder, ShapeRanges((1, 1, 2), (64, 64, 128), (64, 64, 128), (1, 1, 1)), progress=False)
    build(folder, ShapeRanges.static(1, 64, 64), models=("unet",), progress=False)
    return folder


@pytest.mark.tensorrt
@pytest.mark.parametrize("size", SIZES)
def test_tensorrt_matches_the_cpu_across_the_dynamic_profile(trt_model, cpu_images, size):
    from sdrt import Pipeline

    pipe = Pipeline.load(trt_model, backend="tensorrt")
    got = pixels(pipe.generate("a photo of a cat", width=size[0], height=size[1], **ARGS))
    assert not np.isnan(got).any()
    assert np.abs(got - cpu_images[size]).max() <= FP16_TOLERANCE_255


@pytest.mark.tensorrt
def test_cuda_graph_replay_gives_the_engine_outputs(trt_model):
    from sdrt.engines.plan import static_profile
    from sdrt.engines.tensorrt import TensorRTEngine

    rng = np.random.default_rng(0)

    def feeds():
        return {
            "sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
            "timestep": np.full((2,), 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32),
        }

    graphed = TensorRTEngine(trt_model / "unet" / "model.onnx")
    plain = TensorRTEngine(trt_model / "unet" / "model.onnx", cuda_graph=False)
    first, second = feeds(), feeds()
    graphed.run(first)  # runs and captures
    assert graphed.graph is not None and static_profile(graphed.identity.profile)
    np.testing.assert_allclose(graphed.run(second)["out_sample"], plain.run(second)["out_sample"], atol=1e-3)


@pytest.mark.tensorrt
def test_low_vram_tensorrt_gives_the_same_image(trt_model):
    from sdrt import Pipeline

    staged = Pipeline.load(trt_model, backend="tensorrt", low_vram=True)
    full = Pipeline.load(trt_model, backend="tensorrt")
    a = pixels(staged.generate("a cat", width=64, height=64, **ARGS))
    b = pixels(full.generate("a cat", width=64, height=64, **ARGS))
    assert np.abs(a - b).max() <= 1
