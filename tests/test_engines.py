"""ONNX Runtime engine: the optimised-graph cache is reused, keyed to the file, and survives damage."""

import shutil

import numpy as np

from sdrt.engines.onnxruntime import OnnxRuntimeEngine


def run_vae(engine):
    latent = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    return engine.run({"latent_sample": latent})["sample"]


def test_optimised_graph_is_cached_and_reused(tiny_sd, tmp_path):
    folder = tmp_path / "vae_decoder"
    shutil.copytree(tiny_sd[1] / "vae_decoder", folder, ignore=shutil.ignore_patterns(".ort-cache"))
    first = OnnxRuntimeEngine(folder / "model.onnx", ["CPUExecutionProvider"])
    want = run_vae(first)
    cached = first.cache_path()
    assert cached.is_file() and cached.parent.parent.name == ".ort-cache"
    left = [p.name for p in cached.parent.parent.iterdir() if not p.name.endswith(".lock")]
    assert left == [cached.parent.name]  # no staging left behind
    second = OnnxRuntimeEngine(folder / "model.onnx", ["CPUExecutionProvider"])
    np.testing.assert_array_equal(run_vae(second), want)
    assert second.cache_path() == cached


def test_damaged_cache_entry_falls_back_to_the_model(tiny_sd, tmp_path):
    folder = tmp_path / "vae_decoder"
    shutil.copytree(tiny_sd[1] / "vae_decoder", folder, ignore=shutil.ignore_patterns(".ort-cache"))
    engine = OnnxRuntimeEngine(folder / "model.onnx", ["CPUExecutionProvider"])
    want = run_vae(engine)
    engine.cache_path().write_bytes(b"garbage")
    again = OnnxRuntimeEngine(folder / "model.onnx", ["CPUExecutionProvider"])
    np.testing.assert_array_equal(run_vae(again), want)


def test_cache_key_follows_the_model_file(tiny_sd, tmp_path, monkeypatch):
    folder = tmp_path / "vae_decoder"
    shutil.copytree(tiny_sd[1] / "vae_decoder", folder, ignore=shutil.ignore_patterns(".ort-cache"))
    engine = OnnxRuntimeEngine(folder / "model.onnx", ["CPUExecutionProvider"])
    before = engine.cache_path()
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes())  # new mtime: a re-export
    assert engine.cache_path() != before
    monkeypatch.setenv("SDRT_NO_ORT_CACHE", "1")
    assert engine.cache_path() is None
