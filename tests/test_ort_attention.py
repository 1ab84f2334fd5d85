"""The exported graphs' attention rewritten for ONNX Runtime's tiled CPU kernel (engines/ort_attention.py): each
graph of the tiny SD 1.5 and SDXL exports against its own plain form on the same inputs (1e-5 relative: the same
sums in another order), the CPU engine running the rewritten graph, and can-fail twins (a wrong head count or scale
in the rewritten node is seen). The images against diffusers are the parity suites' (test_parity.py and the rest run
the CPU engine, hence this rewrite).
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from sdrt.engines.ort_attention import MS_DOMAIN, rewrite, rewritten_model

REL_TOL = 1e-5


def feeds_for(session, height=16, width=24, batch=2) -> dict:
    """Random inputs at a latent size; the timestep in the schedule's range."""
    sizes = {"batch": batch, "latent_height": height, "latent_width": width, "height": 8 * height, "width": 8 * width,
             "tokens": 77}  # fmt: skip
    rng = np.random.default_rng(0)
    feeds = {}
    for meta in session.get_inputs():
        shape = [d if isinstance(d, int) else sizes[d] for d in meta.shape]
        feeds[meta.name] = rng.standard_normal(shape).astype(np.float32) * (400 if meta.name == "timestep" else 1)
    return feeds


def run(model, folder, feeds) -> list:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def rel_error(got: list, want: list) -> float:
    return max(float(np.abs(g - w).max() / max(1.0, np.abs(w).max())) for g, w in zip(got, want, strict=True))


def ops(model_bytes: bytes) -> list[str]:
    return [n.op_type for n in onnx.load_from_string(model_bytes).graph.node]


@pytest.fixture(scope="module")
def graphs(tiny_sd, tiny_sdxl):
    """{name: (exported model file, its attention count)} for the graphs with diffusers attention."""
    sd, xl = tiny_sd[1], tiny_sdxl["base"][1]
    return {"sd-unet": (sd / "unet" / "model.onnx", 8), "sd-vae-decoder": (sd / "vae_decoder" / "model.onnx", 1),
            "sd-vae-encoder": (sd / "vae_encoder" / "model.onnx", 1),
            "sdxl-unet": (xl / "unet" / "model.onnx", 16)}  # fmt: skip


@pytest.mark.parametrize("name", ["sd-unet", "sd-vae-decoder", "sd-vae-encoder", "sdxl-unet"])
def test_rewritten_graph_matches_the_plain_one(graphs, name):
    model_file, attention = graphs[name]
    plain = onnx.load(str(model_file), load_external_data=False)
    assert [n.op_type for n in plain.graph.node].count("Softmax") == attention
    tiled = rewritten_model(model_file)
    assert ops(tiled).count("MultiHeadAttention") == attention and "Softmax" not in ops(tiled)
    assert len(ops(tiled)) < len(plain.graph.node) - 10 * attention  # the patterns' shape arithmetic went with them
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    feeds = feeds_for(session)
    want = session.run(None, feeds)
    assert rel_error(run(tiled, model_file.parent, feeds), want) <= REL_TOL


@pytest.mark.parametrize("attribute", ["num_heads", "scale"])
def test_a_wrong_head_count_or_scale_is_seen(graphs, attribute):
    """Can-fail twin: the same rewrite with one node's heads doubled or scale halved is far from the plain graph."""
    model_file, _ = graphs["sd-unet"]
    model = onnx.load_from_string(rewritten_model(model_file))
    node = next(n for n in model.graph.node if n.op_type == "MultiHeadAttention")
    value = next(a for a in node.attribute if a.name == attribute)
    node.attribute.remove(value)
    wrong = value.i * 2 if attribute == "num_heads" else value.f / 2
    node.attribute.append(helper.make_attribute(attribute, wrong))
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    feeds = feeds_for(session)
    assert rel_error(run(model.SerializeToString(), model_file.parent, feeds), session.run(None, feeds)) > 100 * REL_TOL


def test_graphs_without_diffusers_attention_are_left_alone(tiny_sd):
    """The text encoder (transformers' causal attention) has no pattern: run from its file as before."""
    assert rewritten_model(tiny_sd[1] / "text_encoder" / "model.onnx") is None


def test_a_softmax_that_is_not_attention_stays():
    """softmax(x) @ w: no scaled q k^T before it, nothing replaced."""
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.ones((4, 5), np.float32), "w")],
    )  # fmt: skip
    assert rewrite(graph) == 0 and [n.op_type for n in graph.node] == ["Softmax", "MatMul"]


def test_the_cpu_engine_runs_the_tiled_graph(tiny_sd, tmp_path):
    """OnnxRuntimeEngine on the CPU: its optimised graph (the cache) holds MultiHeadAttention and no Softmax, its
    outputs are the plain graph's, and the export's files are untouched."""
    import shutil

    from sdrt.engines.onnxruntime import OnnxRuntimeEngine

    folder = tmp_path / "unet"
    shutil.copytree(tiny_sd[1] / "unet", folder, ignore=shutil.ignore_patterns(".ort-cache"))
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    engine = OnnxRuntimeEngine(folder / "model.onnx", ["CPUExecutionProvider"])
    engine.load()
    cached = [n for n in onnx.load(str(engine.optimized_file), load_external_data=False).graph.node]
    assert sum(n.op_type == "MultiHeadAttention" and n.domain == MS_DOMAIN for n in cached) == 8
    assert not any(n.op_type == "Softmax" for n in cached)
    plain = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = feeds_for(plain)
    got = engine.run(feeds)
    assert rel_error([got[name] for name in engine.output_names], plain.run(None, feeds)) <= REL_TOL
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name in before} == before
