"""Weights held once (issue 25): the pages of memory-mapped weight files given back after a compile (mapped.py),
and OpenVINO reading every graph from a file it maps (openvino_ir.py), so that only the compiled copy stays."""

import mmap
import sys

import numpy as np
import pytest

from sdrt.engines import mapped

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")


def mapped_rss(path) -> int:
    """Bytes of PATH's mappings resident in this process (/proc/self/smaps)."""
    import os

    wanted, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=5)
            if "-" in first[0] and len(first) >= 5 and not first[0].endswith(":"):
                inside = len(first) == 6 and first[5].strip() == wanted
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


@linux
def test_released_pages_leave_rss_and_read_back_unchanged(tmp_path):
    data = np.random.default_rng(0).standard_normal(2**20, dtype=np.float32)  # 4 MiB
    kept = tmp_path / "kept.bin"
    data.tofile(tmp_path / "weights.bin")
    data.tofile(kept)
    views = []
    for name in ("weights.bin", "kept.bin"):
        with open(tmp_path / name, "rb") as f:
            views.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    arrays = [np.frombuffer(view, dtype=np.float32) for view in views]
    assert all(float(a.sum()) == float(data.sum()) for a in arrays)  # every page read: resident
    assert mapped_rss(tmp_path / "weights.bin") >= 4 * 2**20 and mapped_rss(kept) >= 4 * 2**20
    assert mapped.release_pages([tmp_path / "weights.bin"]) == 1
    assert mapped_rss(tmp_path / "weights.bin") == 0
    assert mapped_rss(kept) >= 4 * 2**20  # can fail: a file not named keeps its pages
    np.testing.assert_array_equal(arrays[0], data)  # read back from the page cache, unchanged
    del arrays
    for view in views:
        view.close()


def test_writable_mappings_are_never_released(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\0" * 2**16)
    with open(tmp_path / "w.bin", "r+b") as f:
        view = mmap.mmap(f.fileno(), 0)  # read-write, shared: its pages may hold writes
        view[0] = 7
        assert mapped.read_only_mappings([tmp_path / "w.bin"]) == []
        assert mapped.release_pages([tmp_path / "w.bin"]) == 0 and view[0] == 7
        view.close()


# ----------------------------------------------------------------------------------------------- OpenVINO

ov = pytest.importorskip("openvino", reason="the openvino extra is not installed")

import sdrt.engines.openvino as ov_backend  # noqa: E402  (after the importorskip above)


def unet_feeds() -> dict:
    rng = np.random.default_rng(1)
    return {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
            "timestep": np.array([900.0, 20.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}  # fmt: skip


def compile_unet(engine) -> None:
    """Compile ENGINE for unet_feeds' shapes, without running it (a run reads the weights it uses in place)."""
    engine.load()
    engine.compiled_for(tuple((name, value.shape) for name, value in unet_feeds().items()))


@linux
def test_openvino_reads_inline_graphs_from_a_mapped_ir_and_gives_its_pages_back(tiny_sd, tmp_path, monkeypatch):
    from sdrt.engines import create_engine
    from sdrt.engines.onnx_weights import OnnxWeights

    monkeypatch.setenv("SDRT_CACHE", str(tmp_path))
    model_file = tiny_sd[1] / "unet" / "model.onnx"
    engine = create_engine(model_file, "openvino-f32")
    compile_unet(engine)
    (bin_file,) = engine.weight_files
    assert bin_file.suffix == ".bin" and tmp_path in bin_file.parents  # the tiny graph's weights are inline: IR
    weights = OnnxWeights(model_file)
    f32_bytes = sum(info.length for info in weights.initializers.values() if info.dtype == np.float32)
    weights.close()
    assert bin_file.stat().st_size >= 0.95 * f32_bytes  # kept f32 (save_model would halve them by default)
    assert mapped_rss(bin_file) < 64 * 1024  # given back after the compile: the compiled copy is the one held
    got = engine.run(unet_feeds())["out_sample"]  # weights used in place are read back from the page cache
    expected = create_engine(model_file, "cpu").run(unet_feeds())["out_sample"]  # ONNX Runtime, the same graph
    assert np.abs(got - expected).max() <= 2e-5 * np.abs(expected).max()  # the IR is the same graph
    mtime = bin_file.stat().st_mtime_ns
    again = create_engine(model_file, "openvino-f32")
    np.testing.assert_array_equal(again.run(unet_feeds())["out_sample"], got)
    assert again.weight_files == [bin_file] and bin_file.stat().st_mtime_ns == mtime  # converted once


@linux
def test_without_the_release_the_source_pages_stay(tiny_sd, tmp_path, monkeypatch):
    """The twin of the test above: with release_pages a no-op, the compile leaves the IR's pages resident."""
    import sdrt.engines.mapped as mapped_module
    from sdrt.engines import create_engine

    monkeypatch.setenv("SDRT_CACHE", str(tmp_path))
    monkeypatch.setattr(mapped_module, "release_pages", lambda files: 0)
    engine = create_engine(tiny_sd[1] / "unet" / "model.onnx", "openvino-f32")
    compile_unet(engine)
    assert mapped_rss(engine.weight_files[0]) > 0.5 * engine.weight_files[0].stat().st_size


def test_graphs_with_external_data_are_read_as_they_are(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sdrt.engines.openvino_ir import external_data_files, graph_source

    weight = numpy_helper.from_array(np.ones((256, 256), np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])], [weight])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, tmp_path / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    assert external_data_files(tmp_path / "model.onnx") == [tmp_path / "model.onnx.data"]
    from sdrt.engines.openvino import core

    source, files = graph_source(tmp_path / "model.onnx", tmp_path / "cache", core())
    assert source == tmp_path / "model.onnx" and files == [tmp_path / "model.onnx.data"]
    assert not (tmp_path / "cache").exists()  # nothing converted


def test_no_lora_folder_no_second_copy_of_the_weights(tiny_sd, tmp_path):
    """Without a LoRA folder, ONNX Runtime's engines keep no base values beside the session's weights; with one, the
    base values of the layers LoRAs change are maps of the file (ort_weights.py), not copies."""
    from tiny_lora import one_layer_lora

    from sdrt import Pipeline

    args = dict(width=64, height=64, steps=2, seed=5, progress=False)
    pipe = Pipeline.load(tiny_sd[1], backend="cpu")
    pipe.generate("a cat", **args)
    assert all(e._live is None and e._whole is None and not e.weights for e in pipe.engines.values())
    one_layer_lora(tiny_sd[1], tmp_path / "one.safetensors")
    with_loras = Pipeline.load(tiny_sd[1], backend="cpu", loras=tmp_path)
    with_loras.generate("a cat <lora:one:1>", **args)  # a LoRA used: its layers' buffers, bases mapped
    lives = [e._live for e in with_loras.engines.values() if getattr(e, "_live", None) is not None]
    assert lives and all(live.base for live in lives)  # can fail: the LoRA's layers are replaceable now
    for live in lives:  # the base values are read-only maps of the cached graph's file, not copies
        assert all(not b.flags.writeable and not b.flags.owndata for b in live.base.values())


# ------------------------------------------------------------------ bf16: MatMul weights stored bf16 in the IR


def linear_stack(path, layers: int = 4, width: int = 64, external: bool = True) -> None:
    """An ONNX graph of LAYERS MatMuls with (width, width) f32 weights at PATH: x (1, 8, width) -> y."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weights = [numpy_helper.from_array((rng.standard_normal((width, width)) / width**0.5).astype(np.float32), f"w{i}")
               for i in range(layers)]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}"]) for i in range(layers)]
    nodes[-1].output[0] = "y"
    x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 8, width]) for name in ("x", "y"))
    graph = helper.make_graph(nodes, "g", [x], [y], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(model, path, save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(model, path)


def test_bf16_bits_round_to_nearest_even_as_torch_does():
    import torch

    from sdrt.engines.openvino_ir import bf16_bits

    values = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 100
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x7F800000], np.uint32).view(np.float32)
    values = np.concatenate([values, ties, [0.0, -0.0, 1e-30, 3e38]]).astype(np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_bits(values), expected)
    assert bf16_bits(ties[:2]).tolist() == [0x3F80, 0x3F82]  # ties go to the even neighbour


def test_bf16_ir_stores_matmul_weights_in_bf16_marked_as_decompression(tmp_path):
    """The IR's .bin holds each MatMul weight in 2 bytes, its Converts carry OpenVINO's decompression mark, and the
    graph computes with exactly the bf16-rounded weights (compiled in f32 here, so any CPU can check it)."""
    import onnx

    from sdrt.engines.openvino import core
    from sdrt.engines.openvino_ir import bf16_bits, graph_source

    linear_stack(tmp_path / "m" / "model.onnx", layers=4, width=64)
    source, files = graph_source(tmp_path / "m" / "model.onnx", tmp_path / "cache", core(), "bf16")
    assert source.suffix == ".xml" and files == [source.with_suffix(".bin")] and tmp_path / "cache" in source.parents
    assert source.with_suffix(".bin").stat().st_size == 4 * 64 * 64 * 2  # bf16: half the f32 weights' bytes
    assert source.read_text().count('<attribute name="decompression"') == 4
    x = np.random.default_rng(4).standard_normal((1, 8, 64)).astype(np.float32)
    model = core().read_model(str(source))
    got = core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({"x": x})[0]
    graph = onnx.load(tmp_path / "m" / "model.onnx")
    expected = x
    for init in graph.graph.initializer:  # w0..w3, in order
        w = onnx.numpy_helper.to_array(init)
        rounded = (bf16_bits(w).astype(np.uint32) << 16).view(np.float32)
        assert not np.array_equal(rounded, w)  # can fail: the rounding changes the weights
        expected = expected @ rounded
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    f32_source, _ = graph_source(tmp_path / "m" / "model.onnx", tmp_path / "cache", core(), "f32")
    assert f32_source == tmp_path / "m" / "model.onnx"  # f32: external data read as it is


needs_bf16 = pytest.mark.skipif(not ov_backend.cpu_has_bf16(), reason=ov_backend.NO_BF16_REASON)


@needs_bf16
def test_bf16_engine_from_the_bf16_ir_is_bit_identical_to_the_f32_source(tiny_sd, tmp_path, monkeypatch):
    """The bf16 IR changes where the weights live, not the result: the tiny UNet compiled in bf16 from it gives the
    same bits as from the f32 graph (the plugin rounds the same way), and the IR is what the engine read."""
    import sdrt.engines.openvino as openvino_engine
    from sdrt.engines.openvino import OpenVINOEngine
    from sdrt.engines.openvino_ir import graph_source

    monkeypatch.setenv("SDRT_CACHE", str(tmp_path))
    model_file = tiny_sd[1] / "unet" / "model.onnx"
    engine = OpenVINOEngine(model_file, precision="bf16")
    got = engine.run(unet_feeds())["out_sample"]
    assert engine.weight_files[0].suffix == ".bin" and "decompression" in engine.weight_files[0].with_suffix(
        ".xml").read_text()  # fmt: skip
    monkeypatch.setattr(openvino_engine, "graph_source", lambda f, root, core, precision: graph_source(f, root, core))
    old = OpenVINOEngine(model_file, precision="bf16").run(unet_feeds())["out_sample"]
    np.testing.assert_array_equal(got, old)
    f32 = OpenVINOEngine(model_file, precision="f32").run(unet_feeds())["out_sample"]
    assert not np.array_equal(got, f32)  # can fail: bf16 did run in bf16


ANON_AFTER_RUN = """
import sys, numpy as np
from sdrt.engines.openvino import OpenVINOEngine
engine = OpenVINOEngine(sys.argv[1], precision=sys.argv[2])
engine.run({"x": np.ones((1, 8, int(sys.argv[3])), np.float32)})
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon")))
"""


@linux
@needs_bf16
def test_bf16_matmul_weights_are_held_at_two_bytes(tmp_path):
    """24 Linear layers of 1024x1024 (96 MiB in f32): compiled in bf16 (read from the bf16 IR) they cost about 48 MiB
    of anonymous memory over a one-layer graph's process, not 96 (on this project's AVX512_BF16 EPYC, OpenVINO held
    them at 4 bytes from the f32 graph). The twin, the same graph in f32, costs its 96 MiB: the measure tells 2 bytes
    from 4. Each graph in a fresh process."""
    import os
    import subprocess

    env = {**os.environ, "SDRT_CACHE": str(tmp_path / "cache")}
    anon = {}
    for name, layers, width in (("big", 24, 1024), ("small", 1, 8)):
        linear_stack(tmp_path / name / "model.onnx", layers=layers, width=width)
        for precision in ("bf16", "f32"):
            args = [str(tmp_path / name / "model.onnx"), precision, str(width)]
            done = subprocess.run([sys.executable, "-c", ANON_AFTER_RUN, *args], capture_output=True, text=True,
                                  env=env, check=True)  # fmt: skip
            anon[name, precision] = int(done.stdout.split()[-1])
    weights = {precision: anon["big", precision] - anon["small", precision] for precision in ("bf16", "f32")}
    assert weights["bf16"] < 64 * 2**20, weights  # 48 MiB of weights at 2 bytes (at 4: 96)
    assert weights["f32"] > 80 * 2**20, weights  # can fail: f32 holds the 96 MiB
