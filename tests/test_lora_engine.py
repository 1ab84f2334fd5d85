"""The pieces under LoRA merging: the export's weight map, the torch-free ONNX initializer reader, the ONNX Runtime
engine's set_weights (through the optimised-graph cache, and without it), and the TensorRT refit plan."""

import json

import numpy as np
import pytest
import torch

from sdrt.engines.engine_files import refit_plan
from sdrt.engines.onnx_weights import OnnxWeights
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


@pytest.mark.parametrize("layout", ["same", "bibo8", "bo8", "bibo16", "bo16"])
@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (24, 8, 1, 1), (12, 4, 3, 3)], ids=["3x3", "1x1", "padded"])
def test_merge_into_every_layout(layout, shape):
    """base + low-rank products (two stacked) + a whole array, merged straight into an NCHWc buffer, equals the merge
    done in the file's layout and then laid out; a buffer read in another layout does not."""
    from sdrt.engines import nchwc
    from sdrt.engines.weight_merge import LowRank, merge_all, merge_into

    rng = np.random.default_rng(len(layout) + shape[0])
    base = rng.standard_normal(shape).astype(np.float32)
    cols = int(np.prod(shape[1:]))
    terms = [LowRank(rng.standard_normal((shape[0], 3), np.float32), rng.standard_normal((3, cols), np.float32)),
             LowRank(rng.standard_normal((shape[0], 2), np.float32), rng.standard_normal((2, cols), np.float32)),
             rng.standard_normal(shape).astype(np.float32)]  # fmt: skip
    want_file = base + (terms[0].left @ terms[0].right + terms[1].left @ terms[1].right).reshape(shape) + terms[2]
    want = nchwc.to_layout(want_file, layout)
    laid_base = nchwc.to_layout(base, layout).copy()
    buffer = np.full_like(laid_base, np.nan)
    merge_into(buffer, laid_base, layout, shape, terms)
    np.testing.assert_allclose(buffer, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(laid_base, nchwc.to_layout(base, layout)), "the base was written"
    merge_all([(buffer, laid_base, layout, shape, [])], threads=2)  # no terms: the base back, exactly
    assert np.array_equal(buffer, laid_base)
    if layout != "same" and shape[0] % 16 == 0 and shape[1] % 16 == 0:
        other = "bo8" if layout.startswith("bibo") else "bibo8"
        merge_into(buffer, laid_base, other, shape, terms)
        assert not np.allclose(buffer, want, atol=1e-3), "a merge in the wrong layout went unnoticed"


@pytest.mark.parametrize("cache", [True, False], ids=["in-place", "whole-arrays"])
def test_merge_weights_switches_and_restores(tiny_sd, monkeypatch, cache):
    """merge_weights on the UNet: the output of base + low-rank terms equals that of the same weights given whole
    (set_weights, another code path); a second merge is written in place (same session) with the cache; merging
    nothing gives the file's values back, bit for bit in the engine's buffers."""
    from sdrt.engines.onnxruntime import OnnxRuntimeEngine
    from sdrt.engines.weight_merge import LowRank, merged_value

    if not cache:
        monkeypatch.setenv("SDRT_NO_ORT_CACHE", "1")
    pipe, folder = tiny_sd
    names = sorted({e["initializer"] for e in Manifest.load(folder).weight_map("unet").values()})
    model = folder / "unet" / "model.onnx"
    engine = OnnxRuntimeEngine(model, ["CPUExecutionProvider"])
    reference = OnnxRuntimeEngine(model, ["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
             "timestep": np.array([500.0, 20.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}  # fmt: skip
    before = engine.run(feeds)[engine.output_names[0]]
    base = engine.read_weights(names)

    def terms(seed):
        r = np.random.default_rng(seed)
        return {n: [LowRank(r.standard_normal((base[n].shape[0], 4), np.float32) * 0.05,
                            r.standard_normal((4, base[n][0].size), np.float32) * 0.05)] for n in names}  # fmt: skip

    sessions = []
    for seed in (2, 3):
        updates = terms(seed)
        engine.merge_weights(updates)
        sessions.append(engine.session)
        reference.set_weights({n: merged_value(base[n], t) for n, t in updates.items()})
        got, want = engine.run(feeds)[engine.output_names[0]], reference.run(feeds)[reference.output_names[0]]
        np.testing.assert_allclose(got, want, atol=1e-4 * float(np.abs(want).max()), rtol=0)
        assert np.abs(got - before).max() > 0.1 * np.abs(before).max()
    assert (sessions[0] is sessions[1]) == cache
    engine.merge_weights({})
    restored = engine.run(feeds)[engine.output_names[0]]
    np.testing.assert_allclose(restored, before, atol=1e-5 * float(np.abs(before).max()), rtol=0)
    if cache:
        assert engine.session is sessions[0]
        assert all(np.array_equal(engine._live.buffers[n], engine._live.base[n]) for n in names)
