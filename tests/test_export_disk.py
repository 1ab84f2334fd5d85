"""An export's disk: to_onnx.gather_external_data with consume=True (what every export over 2 GB uses) deletes the
exporter's per-tensor data files as it copies them into the one data file, so an export needs its graph's size free
once, not twice, and the gathered graph computes the same; the space estimate counts every component of a
transformer-family folder (SD 3.5 / FLUX: transformer, text_encoder_3)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdrt.export import faults
from sdrt.export.to_onnx import gather_external_data


def split_graph(folder):
    """A two-MatMul graph saved with each initializer in a data file of its own; an input feed and the weights'
    product."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("MatMul", ["h", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir()
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=256)  # fmt: skip
    return {"x": rng.standard_normal((1, 64)).astype(np.float32)}, a @ b


@pytest.mark.parametrize("consume", [True, False])
def test_gather_consumes_the_exporters_files(tmp_path, consume):
    feeds, ab = split_graph(tmp_path / "split")
    assert len(list((tmp_path / "split").iterdir())) == 3  # model.onnx, a, b
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    gather_external_data(tmp_path / "split" / "model.onnx", out, consume=consume)
    left = sorted(p.name for p in (tmp_path / "split").iterdir())
    # consume=False (the can-fail twin) leaves the per-tensor files where they were
    assert left == ["model.onnx"] if consume else len(left) == 3
    y = ort.InferenceSession(str(out)).run(None, feeds)[0]
    np.testing.assert_allclose(y, feeds["x"] @ ab, rtol=1e-5, atol=1e-4)


def test_the_estimate_counts_a_transformer_folder(tmp_path):
    from safetensors.numpy import save_file

    sizes = {"transformer": 1000, "text_encoder_3": 500, "vae": 100, "text_encoder": 40, "tokenizer": 0}
    for component, count in sizes.items():
        (tmp_path / component).mkdir()
        if count:
            weights = {"w": np.zeros(count, np.float32)}
            save_file(weights, str(tmp_path / component / "diffusion_pytorch_model.safetensors"))
    assert faults.source_parameters(str(tmp_path)) == 1640
    # the can-fail twin: without the transformer's folder the count is that much smaller
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    assert faults.source_parameters(str(tmp_path)) == 640
