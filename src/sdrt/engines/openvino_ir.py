"""The file OpenVINO reads a graph from, so that its source weights are memory-mapped (and can be given back).

OpenVINO maps an ONNX graph's external data file and an IR's .bin file; it reads weights stored inside an .onnx
file (graphs under 2 GB: sdrt's text encoders and VAEs) into its own memory, which the compiled model then keeps
beside its re-laid copy. Such a graph is converted once to OpenVINO's IR (weights unchanged, f32) in sdrt's cache
folder, keyed by the ONNX file, its size and time, and OpenVINO's version; in f32 a graph with external data is read
as it is. mapped.py then gives the mapped pages back once the graph is compiled.

In bf16, OpenVINO's CPU plugin keeps a MatMul's f32 constant weight at f32 size: its FullyConnected layers hold 4 bytes
per weight although they run in bf16 (measured: 24 Linear layers of 2048x2048, 0.41 GiB anonymous memory after the
compile in f32 and in bf16 alike). A MatMul whose weight arrives as a bf16
constant and a Convert marked as decompression keeps it at 2 bytes. So a graph compiled in bf16 is read from its own
IR, "bf16 weights": each MatMul's f32 weight stored rounded to bf16 (round to nearest even, what the plugin does to
run it in bf16: the outputs are bit-identical), the rest as it is. SDXL's UNet holds 8.2 GiB of MatMul weights:
4.1 GiB less resident (docs/benchmarks/cpu-memory.md).
"""

import hashlib
import logging
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from sdrt.engines.mapped import ReleasingPages, trim_heap
from sdrt.engines.onnx_weights import OnnxWeights

log = logging.getLogger("sdrt.engines")


def external_data_files(model_file: Path) -> list[Path]:
    """The external data files MODEL_FILE's initializers live in ([] when they are all inside it)."""
    graph = OnnxWeights(model_file)
    try:
        names = {info.location for info in graph.initializers.values() if info.location is not None}
    finally:
        graph.close()
    return sorted(model_file.parent / name for name in names)


def ir_path(model_file: Path, cache_root: Path, bf16_weights: bool = False) -> Path:
    """Where MODEL_FILE's IR lives under CACHE_ROOT (keyed by file, size, time, OpenVINO version, and whether its
    MatMul weights are stored in bf16)."""
    import openvino

    stat = model_file.stat()
    key = f"{model_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{openvino.get_version()}"
    key += "|bf16-matmul-weights" if bf16_weights else ""
    return cache_root / "openvino" / "ir" / hashlib.sha256(key.encode()).hexdigest()[:16] / "model.xml"


def graph_source(model_file: Path, cache_root: Path, core, precision: str | None = None) -> tuple[Path, list[Path]]:
    """(the file to read MODEL_FILE's graph from, the weight files OpenVINO maps when it reads it): the ONNX file
    and its external data, or the IR (converted once with CORE, an openvino.Core) and its .bin; in bf16 (PRECISION)
    always the IR with bf16 MatMul weights. Where the IR cannot be written, the ONNX file (its weights then stay in
    OpenVINO's memory, or at f32 size in bf16: logged)."""
    bf16_weights = precision == "bf16"
    xml = ir_path(model_file, cache_root, bf16_weights)
    if xml.is_file():  # converted before: the ONNX file need not be parsed (0.25 s for SDXL's first text encoder)
        return xml, [xml.with_suffix(".bin")]
    external = external_data_files(model_file)
    if external and not bf16_weights:
        return model_file, external
    try:
        convert(model_file, xml, core, bf16_weights, mapped=external)
    except OSError as e:
        log.info("%s: no IR written (%s): its weights stay in memory beside the compiled model", model_file, e)
        return model_file, external
    return xml, [xml.with_suffix(".bin")]


def convert(model_file: Path, xml: Path, core, bf16_weights: bool = False, mapped=()) -> None:
    """Write MODEL_FILE as OpenVINO IR at XML (+ .bin), weights kept f32 (BF16_WEIGHTS: MatMul weights in bf16);
    written aside, then renamed in. MAPPED: the source's weight files, whose pages are given back as they are read."""
    import openvino

    xml.parent.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=xml.parent.parent))
    try:
        with ReleasingPages(lambda: mapped):
            model = core.read_model(str(model_file))
            marked = store_matmul_weights_bf16(model) if bf16_weights else []
            openvino.save_model(model, str(staging / xml.name), compress_to_fp16=False)
            del model
        trim_heap()  # the bf16 copies, freed: out of RSS before anything is compiled
        mark_decompression(staging / xml.name, marked)
        staging.rename(xml.parent)
    except OSError:
        if not xml.is_file():  # another process may have renamed its copy in first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


BF16_WEIGHT = "sdrt_bf16_weight_"  # the friendly-name prefix of the Converts store_matmul_weights_bf16 adds


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 VALUES rounded to bfloat16 (to nearest, ties to even), as uint16 bit patterns (same shape)."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def store_matmul_weights_bf16(model) -> list[str]:
    """Replace, in MODEL (an openvino.Model), every MatMul's f32 constant weight (its second input) by a bf16
    constant and a Convert back to f32 named BF16_WEIGHT<n>, which carries the constant's tensor names (the ONNX
    initializer's); those Converts' names. A constant read by several MatMuls is converted once."""
    import openvino
    import openvino.opset13 as ops

    converted = {}  # the f32 constant's output -> its Convert
    for node in model.get_ordered_ops():
        if node.get_type_name() != "MatMul":
            continue
        weight = node.input_value(1)
        constant = weight.get_node()
        if constant.get_type_name() != "Constant" or constant.get_element_type() != openvino.Type.f32:
            continue
        key = (constant.get_friendly_name(), weight.get_index())
        if key not in converted:
            values = constant.get_data()  # (in, out) float32, mapped from the source's file
            tensor = openvino.Tensor(openvino.Type.bf16, list(values.shape))
            tensor.data.view(np.uint16)[...] = bf16_bits(values)
            convert_node = ops.convert(openvino.op.Constant(tensor), openvino.Type.f32)
            convert_node.set_friendly_name(f"{BF16_WEIGHT}{len(converted)}")
            convert_node.output(0).set_names(weight.get_names())  # the initializer's name (LoRAs find it by it)
            converted[key] = convert_node
        node.input(1).replace_source_output(converted[key].output(0))
    return [node.get_friendly_name() for node in converted.values()]


def mark_decompression(xml: Path, names: list[str]) -> None:
    """Mark the Convert layers NAMES of the IR at XML as decompression (the attribute OpenVINO's own f16
    compression writes): the CPU plugin then keeps their bf16 constants as they are instead of folding them back to
    f32. Python cannot set that attribute on a node, so it is written into the IR's text."""
    if not names:
        return
    wanted = set(names)
    layer = re.compile(r'(<layer id="\d+" name="([^"]+)" type="Convert" version="opset1">\s*<data[^>]*/>)')

    def marked(match):
        if match.group(2) not in wanted:
            return match.group(1)
        wanted.discard(match.group(2))
        return (
            match.group(1) + '\n\t\t\t<rt_info>\n\t\t\t\t<attribute name="decompression" version="0" />'
            "\n\t\t\t</rt_info>"
        )

    text = layer.sub(marked, xml.read_text())
    if wanted:
        raise OSError(f"{xml}: {len(wanted)} bf16 weight Converts not found in the IR to mark")
    xml.write_text(text)
