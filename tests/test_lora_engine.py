"""The pieces under LoRA merging: the export's weight map, the torch-free ONNX initializer reader, the ONNX Runtime
engine's set_weights (through the optimised-graph cache, and without it), and the TensorRT refit plan."""

import json

import numpy as np
import pytest
import torch

from sdrt.engines.onnx_weights import OnnxWeights
from sdrt.engines.plan import refit_plan
from sdrt.runtime.errors import ModelError
from sdrt.runtime.manifest import Manifest


def test_onnx_reader_matches_onnx(tiny_sd):
    import onnx
    from onnx import numpy_helper

    for name in ("unet", "text_encoder"):
        path = tiny_sd[1] / name / "model.onnx"
        graph = OnnxWeights(path)
        initializers = onnx.load(str(path)).graph.initializer
        assert len(graph.initializers) == len(initializers)
        for init in initializers:
            assert np.array_equal(graph.read(init.name), numpy_helper.to_array(init)), init.name


def test_weight_map_covers_every_layer(tiny_sd):
    """Every Linear and Conv2d of the UNet and text encoder has its initializer, holding its weight in its layout."""
    pipe, folder = tiny_sd
    manifest = Manifest.load(folder)
    for part, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        layers = {n.removeprefix("text_model."): m for n, m in module.named_modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}  # fmt: skip
        weight_map = manifest.weight_map(part)
        assert set(weight_map) == set(layers)
        graph = OnnxWeights(folder / part / "model.onnx")
        for name, entry in weight_map.items():
            weight = layers[name].weight.detach().numpy()
            stored = graph.read(entry["initializer"])
            assert np.array_equal(stored.T if entry["layout"] == "io" else stored, weight), name
        assert json.loads((folder / part / "weights.json").read_text())["left_out"] == {}


@pytest.mark.parametrize("cache", [True, False], ids=["optimised-cache", "no-cache"])
def test_set_weights_matches_torch(tiny_sd, monkeypatch, cache):
    """UNet weights replaced through set_weights (convs re-laid out for ONNX Runtime's NCHWc kernels when the
    cached graph is used; the NCHWc transformer off when not) give PyTorch's output for the same weights."""
    from diffusers import UNet2DConditionModel

    from sdrt.engines.onnxruntime import OnnxRuntimeEngine

    if not cache:
        monkeypatch.setenv("SDRT_NO_ORT_CACHE", "1")
    pipe, folder = tiny_sd
    unet = UNet2DConditionModel.from_pretrained(folder.parent / "diffusers" / "unet").eval()
    weight_map = Manifest.load(folder).weight_map("unet")
    engine = OnnxRuntimeEngine(folder / "unet" / "model.onnx", ["CPUExecutionProvider"])
    engine.load()
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
             "timestep": np.array([500.0, 20.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}  # fmt: skip
    before = engine.run(feeds)[engine.output_names[0]]
    modules = dict(unet.named_modules())
    base = engine.read_weights(e["initializer"] for e in weight_map.values())

    def scaled(factor):
        """Every mapped UNet weight times FACTOR plus 0.01: (PyTorch output, {initializer: value in its layout})."""
        replaced = {}
        with torch.no_grad():
            for name, entry in weight_map.items():
                weight = modules[name].weight
                stored = base[entry["initializer"]]
                weight.copy_(torch.from_numpy(stored.T if entry["layout"] == "io" else stored) * factor + 0.01)
                replaced[entry["initializer"]] = stored * np.float32(factor) + np.float32(0.01)
            inputs = (torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states"))
            return unet(*inputs).sample.numpy(), replaced

    for factor in (1.2, 0.8):  # a new session, then (with the cache) the same names written in place
        want, replaced = scaled(factor)
        session = engine.session
        engine.set_weights(replaced)
        assert (engine.session is session) == (cache and factor == 0.8)
        got = engine.run(feeds)[engine.output_names[0]]
        np.testing.assert_allclose(got, want, atol=2e-4 * float(np.abs(want).max()), rtol=0)
        assert np.abs(got - before).max() > 0.1 * np.abs(before).max()
    engine.set_weights(base)  # the file's values back: in place with the cache (without, another kernel choice)
    restored = engine.run(feeds)[engine.output_names[0]]
    np.testing.assert_allclose(restored, before, atol=1e-5 * float(np.abs(before).max()), rtol=0)
    engine.set_weights({})  # a session without replacements
    assert np.array_equal(engine.run(feeds)[engine.output_names[0]], before)


def test_refit_plan():
    """The TensorRT refit: replaced weights cast to the engine's dtype, previous ones restored from the ONNX file,
    and refusals naming what cannot be refitted."""
    prototypes = {"w1": ((4, 2), np.float16), "w2": ((3,), np.float32)}
    base = {"w1": np.zeros((4, 2), np.float32), "w2": np.ones(3, np.float32)}
    plan = refit_plan(prototypes, {"w1": np.full((4, 2), 0.5, np.float32)}, set(), lambda names: {})
    assert plan.arrays["w1"].dtype == np.float16 and plan.restored == ()
    plan = refit_plan(prototypes, {"w2": np.arange(3.0)}, {"w1", "w2"}, lambda names: {n: base[n] for n in names})
    assert plan.restored == ("w1",) and np.array_equal(plan.arrays["w1"], base["w1"])
    assert plan.arrays["w2"].dtype == np.float32
    with pytest.raises(ModelError, match="sdrt build --refit"):
        refit_plan({}, {"w1": base["w1"]}, set(), lambda names: {})
    with pytest.raises(ModelError, match="'w9' is not refittable"):
        refit_plan(prototypes, {"w9": base["w1"]}, set(), lambda names: {})
    with pytest.raises(ModelError, match="engine holds"):
        refit_plan(prototypes, {"w2": np.zeros(4)}, set(), lambda names: {})
