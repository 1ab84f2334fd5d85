"""The engines' per-machine caches under concurrency and crashes (sdrt/cache_files.py): ONNX Runtime's optimised
graphs and OpenVINO's compiled models are made once by processes started together, a process killed while writing
leaves nothing read as a cache entry, and a damaged entry is made again."""

import os
import shutil
import signal
import time

import numpy as np
import pytest
from test_model_cache import run_child

from sdrt import cache_files
from sdrt.engines.onnxruntime import OnnxRuntimeEngine

LATENT = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)


@pytest.fixture
def vae(tiny_sd, tmp_path):
    folder = tmp_path / "vae_decoder"
    shutil.copytree(tiny_sd[1] / "vae_decoder", folder, ignore=shutil.ignore_patterns(".ort-cache"))
    return folder / "model.onnx"


def reference(vae):
    """The VAE's output without any cache."""
    os.environ["SDRT_NO_ORT_CACHE"] = "1"
    try:
        return OnnxRuntimeEngine(vae, ["CPUExecutionProvider"]).run({"latent_sample": LATENT})["sample"]
    finally:
        del os.environ["SDRT_NO_ORT_CACHE"]


def cache_folder(vae):
    return vae.parent / ".ort-cache"


def visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


# A child that makes the VAE's ORT session; SLOW: filling the cache takes 2 s longer (so the others must wait).
ORT_CHILD = """
    import pathlib, sys, time, numpy as np
    from sdrt.engines import onnxruntime as ortmod
    session = ortmod.OnnxRuntimeEngine._session
    def slow(self, path, optimize, save_to=None, **kw):
        made = session(self, path, optimize, save_to=save_to, **kw)
        if save_to is not None:
            print("filled", file=sys.stderr)
            {on_fill}
        return made
    ortmod.OnnxRuntimeEngine._session = slow
    while not pathlib.Path({go!r}).exists():
        time.sleep(0.01)
    engine = ortmod.OnnxRuntimeEngine(pathlib.Path({vae!r}), ["CPUExecutionProvider"])
    latent = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save({out!r} + ".npy", engine.run({{"latent_sample": latent}})["sample"])
"""


def test_ort_processes_started_together_optimise_once(vae, tmp_path):
    go = tmp_path / "go"
    children = [
        run_child(ORT_CHILD.format(on_fill="time.sleep(2)", go=str(go), vae=str(vae), out=str(tmp_path / f"out{i}")),
                  tmp_path, tmp_path / "cache" / "models", wait=False)  # fmt: skip
        for i in range(3)
    ]
    time.sleep(3)  # imports done
    go.touch()
    results = [(c.wait(timeout=120), c.communicate()[1]) for c in children]
    assert [code for code, _ in results] == [0, 0, 0], [err[-1500:] for _, err in results]
    assert sum("filled" in err for _, err in results) == 1  # one process optimised the graph
    assert sum("waiting for another sdrt process optimising" in err for _, err in results) == 2
    want = reference(vae)
    for i in range(3):
        np.testing.assert_array_equal(np.load(tmp_path / f"out{i}.npy"), want)
    (entry,) = visible(cache_folder(vae))
    assert cache_files.is_complete(cache_folder(vae) / entry)


def test_ort_killed_while_filling_the_cache_then_a_fresh_run(vae, tmp_path):
    go = tmp_path / "go"
    go.touch()
    code = ORT_CHILD.format(on_fill="import os, signal; os.kill(os.getpid(), signal.SIGKILL)", go=str(go),
                            vae=str(vae), out=str(tmp_path / "out"))  # fmt: skip
    returncode, _, err = run_child(code, tmp_path, tmp_path / "cache" / "models")
    assert returncode == -signal.SIGKILL, err[-1500:]
    left = visible(cache_folder(vae))
    assert left and all(".tmp-" in name for name in left)  # the graph written, in a temporary only
    engine = OnnxRuntimeEngine(vae, ["CPUExecutionProvider"])
    np.testing.assert_array_equal(engine.run({"latent_sample": LATENT})["sample"], reference(vae))
    (entry,) = visible(cache_folder(vae))  # the temporary removed, the entry made
    assert cache_files.is_complete(cache_folder(vae) / entry) and engine.optimized_file is not None


def test_ort_entry_damaged_at_its_size_is_removed_and_made_again(vae, caplog):
    first = OnnxRuntimeEngine(vae, ["CPUExecutionProvider"])
    want = first.run({"latent_sample": LATENT})["sample"]
    cached = first.cache_path()
    data = bytearray(cached.read_bytes())
    data[:16] = b"\xff" * 16  # not a protobuf any more, same size: the marker's sizes still match
    cached.write_bytes(bytes(data))
    assert cache_files.is_complete(cached.parent)
    second = OnnxRuntimeEngine(vae, ["CPUExecutionProvider"])
    np.testing.assert_array_equal(second.run({"latent_sample": LATENT})["sample"], want)
    assert "damaged optimised graph" in caplog.text and not cached.parent.exists()
    third = OnnxRuntimeEngine(vae, ["CPUExecutionProvider"])
    np.testing.assert_array_equal(third.run({"latent_sample": LATENT})["sample"], want)
    assert cache_files.is_complete(cached.parent)


def test_ort_cache_on_a_full_disk_runs_without_it(vae, monkeypatch, caplog):
    """Writing the optimised graph fails (ENOSPC): the model runs from its file, and no entry is left."""

    def full(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_files, "publish", full)
    engine = OnnxRuntimeEngine(vae, ["CPUExecutionProvider"])
    np.testing.assert_array_equal(engine.run({"latent_sample": LATENT})["sample"], reference(vae))
    assert "No space left" in caplog.text and visible(cache_folder(vae)) == []


OV_CHILD = """
    import pathlib, sys, time
    import numpy as np
    from sdrt.engines import openvino as ov
    real = ov.core()
    class Core:
        def __getattr__(self, name):
            return getattr(real, name)
        def compile_model(self, model, device, config):
            compiled = real.compile_model(model, device, config)
            print("compiled into", config.get("CACHE_DIR"), file=sys.stderr, flush=True)
            {on_compile}
            return compiled
    ov.core = lambda: Core()
    while not pathlib.Path({go!r}).exists():
        time.sleep(0.01)
    engine = ov.OpenVINOEngine(pathlib.Path({vae!r}), cache_dir=pathlib.Path({cache!r}))
    engine.run({{"latent_sample": np.zeros((1, 4, 8, 8), np.float32)}})
    compiled, _ = next(iter(engine.compiled.values()))
    print("from cache:", compiled.get_property("LOADED_FROM_CACHE"), file=sys.stderr)
"""


def test_openvino_killed_after_compiling_leaves_no_blob_then_a_fresh_run_imports(vae, tmp_path):
    pytest.importorskip("openvino")
    from sdrt.engines.openvino import OpenVINOEngine

    cache = tmp_path / "ov-cache"
    kill = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    (tmp_path / "go").touch()
    code = OV_CHILD.format(on_compile=kill, vae=str(vae), cache=str(cache), go=str(tmp_path / "go"))
    returncode, _, err = run_child(code, tmp_path, tmp_path / "cache" / "models")
    assert returncode == -signal.SIGKILL and "compiled into" in err, err[-1500:]
    assert not any(cache.iterdir())  # the blob was written in the private folder only
    assert any(".tmp-" in p.name for p in cache.parent.iterdir())
    engine = OpenVINOEngine(vae, cache_dir=cache)
    engine.run({"latent_sample": np.zeros((1, 4, 8, 8), np.float32)})
    assert [p.suffix for p in cache.iterdir()] == [".blob"]
    assert not any(".tmp-" in p.name for p in cache.parent.iterdir())  # the dead one's folder removed
    again = OpenVINOEngine(vae, cache_dir=cache)
    again.run({"latent_sample": np.zeros((1, 4, 8, 8), np.float32)})
    compiled, _ = next(iter(again.compiled.values()))
    assert compiled.get_property("LOADED_FROM_CACHE")


def test_openvino_processes_started_together_compile_once(vae, tmp_path):
    """Two processes on one cache folder: one compiles (slowed by 2 s), the other waits and imports its blob."""
    pytest.importorskip("openvino")
    cache, go = tmp_path / "ov-cache", tmp_path / "go"
    code = OV_CHILD.format(on_compile="time.sleep(2)", vae=str(vae), cache=str(cache), go=str(go))
    children = [run_child(code, tmp_path, tmp_path / "cache" / "models", wait=False) for _ in range(2)]
    time.sleep(3)  # imports done
    go.touch()
    results = [(c.wait(timeout=120), c.communicate()[1]) for c in children]
    assert [code for code, _ in results] == [0, 0], [err[-1500:] for _, err in results]
    waited = [err for _, err in results if "waiting for another sdrt process compiling" in err]
    assert len(waited) == 1 and "from cache: True" in waited[0]
    assert sum("from cache: False" in err for _, err in results) == 1  # the other one compiled
    assert [p.suffix for p in cache.iterdir()] == [".blob"]
