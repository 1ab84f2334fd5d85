"""The CPU variant's self-attention as MultiHeadAttention (export/flash_attention.py), whose ONNX Runtime CPU kernel
is flash-tiled, in place of Attention, whose kernel holds the whole score matrix (at 1024 px in SD 1.5: 8 GiB per
image). One node against the op it replaces (1e-5: the same GEMM, softmax and sums in another order), the tiny
UNet's fused variant against diffusers (images within 2/255, txt2img and hires fix) and can-fail twins.
"""

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from diffusers_reference import diffusers_run
from onnx import TensorProto, helper, numpy_helper
from test_hires import diffusers_hires, sdrt_hires
from test_parity import NEGATIVE, PIXEL_TOL, PROMPT, max_diff, sdrt_run

from sdrt.export.flash_attention import unpack_self_attention

HEADS, CHANNELS = 4, 64


def attention_graph(extra_inputs=(), heads=HEADS) -> onnx.ModelProto:
    """x (B, S, C) -> com.microsoft Attention(x, W, b) with random weight and bias (nonzero: the bias split matters)."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((CHANNELS, 3 * CHANNELS)) / 8).astype(np.float32)
    bias = rng.standard_normal(3 * CHANNELS).astype(np.float32)
    node = helper.make_node("Attention", ["x", "w", "b", *extra_inputs], ["y"], name="attn", domain="com.microsoft",
                            num_heads=heads)  # fmt: skip
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", CHANNELS])]
    inputs += [helper.make_tensor_value_info(name, TensorProto.INT32, ["batch"]) for name in extra_inputs]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_unpacked_node_matches_the_attention_op():
    x = np.random.default_rng(1).standard_normal((2, 37, CHANNELS)).astype(np.float32)
    model = attention_graph()
    want = run(model, x)
    assert unpack_self_attention(model.graph) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Split", "MultiHeadAttention"]
    assert model.graph.node[2].input[3] == "b" and model.graph.node[0].input[1] == "w"  # the same initializers
    assert np.abs(run(model, x) - want).max() <= 1e-5


def test_wrong_head_count_is_seen():
    """Can-fail twin: the unpacked node with another head count than the Attention it replaces differs."""
    x = np.random.default_rng(1).standard_normal((2, 37, CHANNELS)).astype(np.float32)
    want = run(attention_graph(), x)
    model = attention_graph(heads=2)
    unpack_self_attention(model.graph)
    assert np.abs(run(model, x) - want).max() > 1e-2


def test_attention_with_a_mask_is_left_alone():
    model = attention_graph(extra_inputs=("mask",))
    assert unpack_self_attention(model.graph) == 0
    assert [n.op_type for n in model.graph.node] == ["Attention"]


@pytest.fixture(scope="module")
def cpu_fused(tiny_sd, tmp_path_factory):
    """The tiny export with its CPU-fused UNet, loaded on it (fused=True, the default without LoRAs)."""
    from sdrt import Pipeline
    from sdrt.export.optimize import optimize

    folder = tmp_path_factory.mktemp("flash") / "onnx"
    shutil.copytree(tiny_sd[1], folder, ignore=shutil.ignore_patterns(".ort-cache"))
    optimize(folder, "cpu", models=["unet"], progress=False)
    pipeline = Pipeline.load(folder, backend="cpu")
    assert pipeline.engines["unet"].model_file.name == "model.cpu.onnx"
    graph = onnx.load(str(folder / "unet" / "model.cpu.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MultiHeadAttention") == 8 and "Attention" not in ops and "Softmax" not in ops
    return pipeline


def test_cpu_fused_unet_matches_diffusers(tiny_sd, cpu_fused):
    kw = dict(negative_prompt=NEGATIVE, width=64, height=72, steps=8, cfg_scale=7.0, sampler="Euler")
    want = diffusers_run(tiny_sd[0], PROMPT, seeds=(7,), **kw)
    got = sdrt_run(cpu_fused, [7], **kw)
    assert max_diff(got, want) <= PIXEL_TOL
    assert max_diff(sdrt_run(cpu_fused, [7], **{**kw, "cfg_scale": 5.0}), want) > 4 * PIXEL_TOL  # can-fail twin


def test_cpu_fused_hires_matches_diffusers(tiny_sd, cpu_fused):
    want = diffusers_hires(tiny_sd[0], 5)
    got = np.asarray(sdrt_hires(cpu_fused, 5, hires_upscaler="Latent")[0])
    assert max_diff(got, want) <= PIXEL_TOL
