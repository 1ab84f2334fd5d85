"""Shared fixtures: a tiny random SD pipeline in diffusers format, exported once with `sdrt export`."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    try:
        import onnxruntime

        has_gpu = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        has_gpu = False
    for item in items:
        if item.get_closest_marker("gpu") is not None and not has_gpu:  # not keywords: ids may say "gpu"
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with onnxruntime-gpu"))


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
def tiny_pipeline(tiny_sd):
    from sdrt import Pipeline

    return Pipeline.load(tiny_sd[1])


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
