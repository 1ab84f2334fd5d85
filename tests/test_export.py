"""sdrt export: folder layout, manifest, dynamic axes, fp16, external data, atomicity, unsafe checkpoints."""

import json
import pickle

import numpy as np
import onnx
import pytest

from sdrt.runtime.errors import InvalidOption, ModelError
from sdrt.runtime.manifest import Manifest


def test_export_layout_and_manifest(tiny_sd):
    _, model = tiny_sd
    manifest = Manifest.load(model)
    assert manifest.family == "sd1" and manifest.prediction_type == "epsilon" and manifest.precision == "fp32"
    assert manifest.scheduler.timestep_spacing is None and manifest.scheduler.steps_offset == 1  # as SD 1.5 sets
    assert manifest.scheduler.beta_schedule == "scaled_linear" and manifest.vae_scaling_factor == 0.18215
    assert manifest.latent_channels == 4 and manifest.latent_downsample == 8 and manifest.native_size == 64
    assert len(manifest.source["sha256"]) == 64 and manifest.source["kind"] == "diffusers"
    for name in ("tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json"):
        assert (model / name).is_file()
    unet = onnx.load(str(model / "unet" / "model.onnx"), load_external_data=False)
    assert max(o.version for o in unet.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in unet.graph.input}
    assert dims["sample"] == ["batch", 4, "latent_height", "latent_width"]
    assert dims["encoder_hidden_states"] == ["batch", "tokens", 32]
    assert [i.name for i in unet.graph.output] == ["out_sample"]


def test_fp16_export_keeps_fp32_io_and_matches_fp32(tiny_sd, tmp_path):
    from sdrt import Pipeline
    from sdrt.export import export

    pipe, model = tiny_sd
    manifest = export(str(model.parent / "diffusers"), tmp_path / "fp16", precision="fp16", progress=False)
    assert manifest.precision == "fp16"
    unet = onnx.load(str(tmp_path / "fp16" / "unet" / "model.onnx"))
    float_types = {t.data_type for t in unet.graph.initializer if t.data_type in (1, 10)}
    assert float_types == {onnx.TensorProto.FLOAT16}
    assert {i.type.tensor_type.elem_type for i in unet.graph.input} == {onnx.TensorProto.FLOAT}
    kw = dict(width=64, height=64, steps=6, seed=3, progress=False)
    half = np.asarray(Pipeline.load(tmp_path / "fp16").generate("a cat", **kw)[0], dtype=np.int16)
    full = np.asarray(Pipeline.load(model).generate("a cat", **kw)[0], dtype=np.int16)
    assert np.abs(half - full).mean() < 3  # fp16 rounding only: mean abs difference under 3/255


def test_failed_export_leaves_nothing(tiny_sd, tmp_path, monkeypatch):
    from sdrt.export import export, to_onnx

    monkeypatch.setitem(to_onnx.TOLERANCE, "fp32", 0.0)  # every model now fails verification
    with pytest.raises(ModelError, match="over the fp32 tolerance"):
        export(str(tiny_sd[1].parent / "diffusers"), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_existing_output_and_bad_precision(tiny_sd, tmp_path):
    from sdrt.export import export

    (tmp_path / "out").mkdir()
    with pytest.raises(InvalidOption, match="--output"):
        export(str(tiny_sd[1].parent / "diffusers"), tmp_path / "out", progress=False)
    with pytest.raises(InvalidOption, match="--precision: got 'fp8'"):
        export(str(tiny_sd[1].parent / "diffusers"), tmp_path / "new", precision="fp8", progress=False)


def test_large_models_go_to_one_external_data_file(tmp_path, monkeypatch):
    import onnxruntime as ort
    import torch

    from sdrt.export import to_onnx
    from sdrt.runtime.modelspec import ModelSpec, TensorSpec

    monkeypatch.setattr(to_onnx, "EXTERNAL_DATA_THRESHOLD", 0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    spec = ModelSpec("toy", (TensorSpec("x", "float32", ("batch", 64)),), (TensorSpec("y", "float32", ("batch", 8)),))
    out = tmp_path / "toy" / "model.onnx"
    to_onnx.export_onnx(module, lambda m, x: m(x), spec, (torch.randn(1, 64),), out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, module(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this would create a file


def test_pickled_checkpoint_with_code_is_refused(tmp_path):
    from sdrt.export.sources import load_source

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": _RunsCode(str(marker))}))
    with pytest.raises(ModelError, match="refusing"):
        load_source(str(ckpt))
    assert not marker.exists()


def test_missing_source_is_a_clear_error(tmp_path):
    from sdrt.export.sources import load_source

    with pytest.raises(ModelError, match="does not exist"):
        load_source(str(tmp_path / "nothing.safetensors"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelError, match="model_index.json"):
        load_source(str(tmp_path / "folder"))


def test_manifest_json_is_versioned(tiny_sd):
    from sdrt.runtime.manifest import MANIFEST_VERSION, Manifest

    data = json.loads((tiny_sd[1] / "model.json").read_text())
    assert data["format"] == "sdrt-model" and data["version"] == MANIFEST_VERSION == 2
    old = tiny_sd[1].parent / "old_manifest"
    old.mkdir(exist_ok=True)
    (old / "model.json").write_text(json.dumps({**data, "version": 1}))
    with pytest.raises(ModelError, match="re-export"):
        Manifest.load(old)


def test_exported_tokenizer_gives_the_source_tokenizers_ids(tiny_sd):
    from sdrt.runtime.tokenizer import ClipTokenizer

    pipe, model = tiny_sd
    ours = ClipTokenizer.from_dir(model / "tokenizer")
    for text in ["a photo of a grey squirrel", "<|STARTOFTEXT|> Sky!! ", "ÉCLAIR, naïve café " * 12]:
        want = pipe.tokenizer([text], padding="max_length", max_length=77, truncation=True).input_ids
        assert ours([text], 77).tolist() == want
