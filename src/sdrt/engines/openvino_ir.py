"""The file OpenVINO reads a graph from, so that its source weights are memory-mapped (and can be given back).

OpenVINO maps an ONNX graph's external data file and an IR's .bin file; it reads weights stored inside an .onnx
file (graphs under 2 GB: sdrt's text encoders and VAEs) into its own memory, which the compiled model then keeps
beside its re-laid copy. Such a graph is converted once to OpenVINO's IR (weights unchanged, f32) in sdrt's cache
folder, keyed by the ONNX file, its size and time, and OpenVINO's version; a graph with external data is read as it
is. mapped.py then gives the mapped pages back once the graph is compiled.
"""

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path

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


def ir_path(model_file: Path, cache_root: Path) -> Path:
    """Where MODEL_FILE's IR lives under CACHE_ROOT (keyed by file, size, time, OpenVINO version)."""
    import openvino

    stat = model_file.stat()
    key = f"{model_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{openvino.get_version()}"
    return cache_root / "openvino" / "ir" / hashlib.sha256(key.encode()).hexdigest()[:16] / "model.xml"


def graph_source(model_file: Path, cache_root: Path, core) -> tuple[Path, list[Path]]:
    """(the file to read MODEL_FILE's graph from, the weight files OpenVINO maps when it reads it): the ONNX file
    and its external data, or the IR (converted once with CORE, an openvino.Core) and its .bin. Where the IR cannot
    be written, the ONNX file and no mapped files (its weights then stay in OpenVINO's memory: logged)."""
    external = external_data_files(model_file)
    if external:
        return model_file, external
    xml = ir_path(model_file, cache_root)
    if not xml.is_file():
        try:
            convert(model_file, xml, core)
        except OSError as e:
            log.info("%s: no IR written (%s): its weights stay in memory beside the compiled model", model_file, e)
            return model_file, []
    return xml, [xml.with_suffix(".bin")]


def convert(model_file: Path, xml: Path, core) -> None:
    """Write MODEL_FILE as OpenVINO IR at XML (+ .bin), weights kept f32; written aside, then renamed in."""
    import openvino

    xml.parent.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=xml.parent.parent))
    try:
        model = core.read_model(str(model_file))
        openvino.save_model(model, str(staging / xml.name), compress_to_fp16=False)
        del model
        staging.rename(xml.parent)
    except OSError:
        if not xml.is_file():  # another process may have renamed its copy in first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
