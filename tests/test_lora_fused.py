"""LoRAs on the fused CPU graph variant (`sdrt optimize --target cpu`; engines/fused_weights.py), on the tiny SD 1.x
model: the fused UNet packs its self-attention's q, k, v into one (C, 3C) weight (MatMul -> Split ->
MultiHeadAttention), into which the LoRA's terms are merged as column blocks. Images within PIXEL_TOL /255 of the
unfused graphs with the same LoRA; back to the base gives the fused graph's own image bit for bit; the twin
(another weight) differs.
"""

import shutil

import numpy as np
import pytest
from test_lora import (
    PIXEL_TOL,
    PROMPT,
    SEED,
    loras,  # noqa: F401  (the test LoRA files: a module fixture)
    max_diff,
)
from test_lora import RUN as LORA_RUN

from sdrt.cli import main

RUN = {**LORA_RUN, "seed": SEED, "progress": False}


@pytest.fixture(scope="module")
def fused_model(tiny_sd, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fused") / "onnx"
    shutil.copytree(tiny_sd[1], folder, ignore=shutil.ignore_patterns(".ort-cache"))
    assert main(["optimize", str(folder), "--target", "cpu"]) == 0
    return folder


def image(pipeline, tags=""):
    return np.asarray(pipeline.generate(f"{PROMPT} {tags}", **RUN)[0])


@pytest.fixture(scope="module")
def pipelines(fused_model, loras):  # noqa: F811
    from sdrt import Pipeline

    fused = Pipeline.load(fused_model, loras=loras[0], fused=True, backend="cpu")
    assert fused.engines["unet"].model_file.name == "model.cpu.onnx"
    return fused, Pipeline.load(fused_model, loras=loras[0], backend="cpu")


@pytest.mark.parametrize("name", ["style", "locon", "loha"])
def test_fused_matches_unfused(pipelines, name):
    fused, plain = pipelines
    want = image(plain, f"<lora:{name}:0.8>")
    assert max_diff(image(fused, f"<lora:{name}:0.8>"), want) <= PIXEL_TOL
    assert max_diff(image(fused, f"<lora:{name}:0.6>"), want) > 4 * PIXEL_TOL, "weight 0.6 vs 0.8 went unnoticed"


def test_packed_attention_weights_are_merged(fused_model, pipelines):
    """The self-attention's q, k, v are column blocks of the fused packed weight, and back to the base the fused
    pipeline gives the plain fused pipeline's image exactly."""
    from sdrt import Pipeline

    fused, _ = pipelines
    image(fused, "<lora:style:1>")
    places = fused.engines["unet"]._places.places
    assert sum(1 for p in places.values() if p and p[1] == "cols") >= 3
    assert max_diff(image(fused), image(Pipeline.load(fused_model, fused=True, backend="cpu"))) == 0


@pytest.mark.gpu
def test_fused_cuda_takes_loras(tiny_sd, loras, tmp_path):  # noqa: F811
    """The fused fp16 CUDA variant with a LoRA (q, k, v packed per head, NhwcConv's OHWI filters: placed by
    engines/fused_weights.py, checked weight by weight on the CPU in tests/test_lora_fused_cuda.py) against the
    unfused CUDA graphs with the same LoRA, fp16: within 3 * PIXEL_TOL."""
    from sdrt import Pipeline

    folder = tmp_path / "onnx"
    shutil.copytree(tiny_sd[1], folder, ignore=shutil.ignore_patterns(".ort-cache"))
    assert main(["optimize", str(folder), "--target", "cuda"]) == 0
    fused = Pipeline.load(folder, loras=loras[0], fused=True, backend="cuda")
    plain = Pipeline.load(folder, loras=loras[0], backend="cuda")
    assert fused.engines["unet"].model_file.name == "model.cuda.onnx"
    want = image(plain, "<lora:locon:0.8>")
    assert max_diff(image(fused, "<lora:locon:0.8>"), want) <= 3 * PIXEL_TOL
    assert max_diff(image(fused, "<lora:locon:0.5>"), want) > 4 * PIXEL_TOL
