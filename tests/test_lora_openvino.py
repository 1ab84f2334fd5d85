"""LoRAs on the OpenVINO engine (engines/openvino_weights.py: weights as inputs, no recompiling per switch), on the
tiny SD 1.x model: every format (kohya, LoCon, PEFT, LoHa, LoKr) within PIXEL_TOL /255 of the ONNX Runtime CPU
engine's image; switching back and forth compiles nothing and gives each state's image bit for bit; the base image
equals the plain OpenVINO engine's (constants). The twin: another weight differs.
"""

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

pytest.importorskip("openvino")

RUN = {**LORA_RUN, "seed": SEED, "progress": False}


@pytest.fixture(scope="module")
def both(tiny_sd, loras):  # noqa: F811
    from sdrt import Pipeline

    ort = Pipeline.load(tiny_sd[1], loras=loras[0], backend="cpu")
    ov = Pipeline.load(tiny_sd[1], loras=loras[0], backend="openvino-f32")
    return ort, ov


def image(pipeline, tags=""):
    return np.asarray(pipeline.generate(f"{PROMPT} {tags}", **RUN)[0])


@pytest.mark.parametrize("name", ["style", "locon", "peft", "loha", "lokr"])
def test_openvino_matches_onnxruntime(both, name):
    ort, ov = both
    want = image(ort, f"<lora:{name}:0.8>")
    assert max_diff(image(ov, f"<lora:{name}:0.8>"), want) <= PIXEL_TOL
    assert max_diff(image(ov, f"<lora:{name}:0.5>"), want) > 4 * PIXEL_TOL, "weight 0.5 vs 0.8 went unnoticed"


def test_openvino_switches_without_compiling(tiny_sd, both):
    """Once the base and LoRAs A and B have been seen, A -> B -> A -> base -> B compiles nothing, each state's image
    bit for bit the same; the base runs the constants model, as a plain OpenVINO pipeline does."""
    from sdrt import Pipeline

    _, ov = both
    image(ov), image(ov, "<lora:style:1>"), image(ov, "<lora:locon:1>")  # constants; the LoRA model of both
    compiles = ov.engines["unet"].compiles
    a1, b1, a2, back, b2 = (image(ov, t) for t in ("<lora:style:1>", "<lora:locon:1>", "<lora:style:1>", "",
                                                    "<lora:locon:1>"))  # fmt: skip
    assert ov.engines["unet"].compiles == compiles, "a switch compiled the UNet again"
    assert max_diff(a1, a2) == 0 and max_diff(b1, b2) == 0 and max_diff(a1, b1) > 10 * PIXEL_TOL
    assert max_diff(back, image(Pipeline.load(tiny_sd[1], backend="openvino-f32"))) == 0


def test_weight_inputs_match_constants(tiny_sd):
    """Every mapped weight an input (a merge of zero terms), before the engine has read its graph: the same input
    names, and the same output as the weights as constants (OpenVINO moves a replaced constant's tensor names onto
    its input)."""
    from sdrt.engines import create_engine
    from sdrt.engines.onnx_weights import OnnxWeights
    from sdrt.engines.weight_merge import LowRank
    from sdrt.runtime.manifest import Manifest

    manifest = Manifest.load(tiny_sd[1])
    names = sorted({layer["initializer"] for layer in manifest.weight_map("unet").values()})
    constants = create_engine(manifest.model_path("unet"), "openvino-f32")
    inputs = create_engine(manifest.model_path("unet"), "openvino-f32")
    graph = OnnxWeights(manifest.model_path("unet"))
    shapes = {name: graph.initializers[name].shape for name in names}
    graph.close()
    zero = {name: [LowRank(np.zeros((s[0], 1), np.float32), np.zeros((1, int(np.prod(s[1:]))), np.float32))]
            for name, s in shapes.items()}  # fmt: skip
    inputs.merge_weights(zero)
    assert inputs.replaceable.variant() and len(inputs.replaceable.variant()) == len(names)
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
             "timestep": np.array([500.0, 500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, manifest.text_hidden_size)).astype(np.float32)}
    want = constants.run(feeds)["out_sample"]
    got = inputs.run(feeds)["out_sample"]
    inputs.load()
    assert inputs.input_names == constants.input_names
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_bf16_lora_matches_the_lora_baked_at_export(tiny_sd, loras, tmp_path):  # noqa: F811
    """OpenVINO bf16 (weights as inputs in the LoRA model, converted to bf16 by the plugin as constants are): the
    image with a LoRA at run time against the bf16 base of an export with the same LoRA baked in (`sdrt export
    --lora`), within PIXEL_TOL (measured: identical); the twin, another weight, differs."""
    import shutil

    from sdrt import Pipeline
    from sdrt.engines.openvino import NO_BF16_REASON, cpu_has_bf16
    from sdrt.export.bake import bake_loras

    if not cpu_has_bf16():
        pytest.skip(NO_BF16_REASON)
    baked = tmp_path / "baked"
    shutil.copytree(tiny_sd[1], baked, ignore=shutil.ignore_patterns(".ort-cache", "*.weights.json"))
    bake_loras(baked, [(loras[0] / "locon.safetensors", 0.8, 0.8)])
    want = image(Pipeline.load(baked, backend="openvino-bf16"))
    runtime = Pipeline.load(tiny_sd[1], loras=loras[0], backend="openvino-bf16")
    assert runtime.engines["unet"].precision == "bf16"
    assert max_diff(image(runtime, "<lora:locon:0.8>"), want) <= PIXEL_TOL
    assert max_diff(image(runtime, "<lora:locon:0.5>"), want) > 4 * PIXEL_TOL, "weight 0.5 vs 0.8 went unnoticed"
