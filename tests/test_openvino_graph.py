"""OpenVINO's graph edit before compiling (engines/openvino_graph.py): baddbmm's zero term removed from every
attention of the tiny exports, the compiled outputs unchanged (the same sums without + 0), and a term that is not
zero, or not before a softmax, kept (can-fail twins: dropping it would change the output)."""

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed")

import openvino as ov  # noqa: E402
from openvino import opset13 as ops  # noqa: E402

from sdrt.engines.openvino_graph import drop_zero_terms  # noqa: E402


def compiled_output(model, feeds: dict) -> np.ndarray:
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(feeds)[0]


def unet_feeds(rng) -> dict:
    return {"sample": rng.standard_normal((2, 4, 8, 12), dtype=np.float32),
            "timestep": np.array([900.0, 20.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}  # fmt: skip


@pytest.mark.parametrize("graph,attention", [("unet", 8), ("vae_decoder", 1)])
def test_zero_terms_are_dropped_and_outputs_kept(tiny_sd, graph, attention):
    model_file = str(tiny_sd[1] / graph / "model.onnx")
    rng = np.random.default_rng(0)
    feeds = unet_feeds(rng) if graph == "unet" else {"latent_sample": rng.standard_normal((1, 4, 8, 12), np.float32)}
    want = compiled_output(ov.Core().read_model(model_file), feeds)
    model = ov.Core().read_model(model_file)
    assert drop_zero_terms(model) == attention
    assert drop_zero_terms(model) == 0  # nothing left to drop
    got = compiled_output(model, feeds)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def scores_model(fill, beta: float, softmax: bool = True):
    """y = softmax(x @ x^T + beta * broadcast(fill)) (or without the softmax): the traced baddbmm's shape."""
    x = ops.parameter([2, 5, 3], np.float32, name="x")
    scores = ops.matmul(x, x, False, True)
    filled = ops.broadcast(ops.constant(np.asarray(fill, np.float32)), ops.shape_of(scores))
    total = ops.add(scores, ops.multiply(filled, ops.constant(np.float32(beta))))
    out = ops.softmax(total, -1) if softmax else total
    return ov.Model([out], [x])


def test_a_term_that_is_not_zero_is_kept():
    """Can-fail twins: 0.5 * (0, 1, 2, 3, 4) per row, or zeros that do not reach a softmax, stay (dropping the first
    would change the output), while 0 * zeros before a softmax goes and the output is the same."""
    x = np.random.default_rng(1).standard_normal((2, 5, 3)).astype(np.float32)
    ramp = np.arange(5)
    assert drop_zero_terms(scores_model(fill=ramp, beta=0.5)) == 0
    assert drop_zero_terms(scores_model(fill=0.0, beta=0.0, softmax=False)) == 0
    model = scores_model(fill=0.0, beta=0.0)
    want = compiled_output(scores_model(fill=0.0, beta=0.0), {"x": x})
    assert drop_zero_terms(model) == 1
    assert np.abs(compiled_output(model, {"x": x}) - want).max() <= 1e-6
    wrong = scores_model(fill=ramp, beta=0.5)  # what dropping a real term would lose: the outputs differ
    assert np.abs(compiled_output(wrong, {"x": x}) - want).max() > 1e-3
