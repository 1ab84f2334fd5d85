"""Upscaler parity against spandrel (what ComfyUI and Forge load upscalers with), in a separate reference venv.

spandrel needs torchvision, which has no working CPU build for sdrt's CPU torch 2.13, so it never enters sdrt's
environment: `benchmarks/make-spandrel-venv.sh` makes /work/spandrel-venv (torch 2.14.1 + torchvision 0.29.1 +
spandrel 0.4.2 from PyPI) and these tests run when SDRT_SPANDREL_PYTHON names its interpreter (skipped otherwise).
tests/spandrel_reference.py runs there in a subprocess; the two sides exchange .pth/.safetensors/.npy files only.

For each architecture sdrt exports (RRDBNet in the Real-ESRGAN and the old ESRGAN layout, SRVGGNetCompact, SwinIR,
Swin2SR, HAT), the tiny random net of tiny_upscalers.py in its official layout: spandrel loads the file and must
detect the same architecture, scale and channels as sdrt; sdrt exports the same file (with the buffers an official
file holds) and its ONNX graph must give spandrel's torch output within 1/255 on the same images. Can-fail twin: a
convolution kernel flipped (a classic porting mistake: one weight tensor read in the wrong order) moves the graph
past that tolerance.

Architectures sdrt has no module for (DAT, OmniSR, SPAN): the worker builds tiny random nets from spandrel's own
modules, `sdrt export-upscaler` runs in the spandrel venv (the optional path through spandrel, upscaler_spandrel.py),
and the graph, run here by ONNX Runtime and by the runtime's UpscalerModel, must give spandrel's output within 1/255.
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tiny_upscalers import REFERENCE_ARCHS, TINY_ARCHS, write_tiny_upscalers

from sdrt.errors import ModelError
from sdrt.runtime.upscale import UPSCALER_INPUT, UPSCALER_MODEL, UpscalerModel, upscale_tiled

SPANDREL_PYTHON = os.environ.get("SDRT_SPANDREL_PYTHON", "")
WORKER = Path(__file__).with_name("spandrel_reference.py")
WHY_SKIPPED = ("no spandrel reference venv: make it with benchmarks/make-spandrel-venv.sh and set "
               "SDRT_SPANDREL_PYTHON=/work/spandrel-venv/bin/python")  # fmt: skip
pytestmark = [pytest.mark.spandrel, pytest.mark.skipif(not Path(SPANDREL_PYTHON or "/nonexistent").is_file(),
                                                       reason=WHY_SKIPPED)]  # fmt: skip

ONE_LEVEL = 1 / 255
MODELS = [*REFERENCE_ARCHS, "rrdb_x4_old", "rrdb_x4_st"]
SRC = Path(__file__).resolve().parents[1] / "src"
# architectures sdrt has no module of its own for, built tiny from spandrel's modules: (class, its arguments, sizes)
SPANDREL_ONLY = {
    "dat_x2": ("DAT", {"img_size": 16, "embed_dim": 32, "split_size": [2, 4], "depth": [2], "num_heads": [2],
                       "expansion_factor": 2.0, "upscale": 2}, [(17, 23), (24, 19)]),
    "omnisr_x2": ("OmniSR", {"num_feat": 16, "block_num": 1, "window_size": 8, "res_num": 1, "up_scale": 2},
                  [(17, 23), (24, 19)]),
    "span_x4": ("SPAN", {"num_in_ch": 3, "num_out_ch": 3, "feature_channels": 16, "upscale": 4},
                [(13, 11), (8, 17)]),
}  # fmt: skip
MEASURED: dict = {}  # key -> max |graph - spandrel| per image size; written to $SDRT_SPANDREL_RECORD if set


def run_spandrel(job: dict, folder: Path) -> dict:
    """Run the reference worker on JOB in the spandrel venv; {key: what spandrel reported}."""
    job = job | {"result": str(folder / "result.json")}
    (folder / "job.json").write_text(json.dumps(job))
    done = subprocess.run([SPANDREL_PYTHON, str(WORKER), str(folder / "job.json")], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"the spandrel worker failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads((folder / "result.json").read_text())
    versions = {"spandrel": result["spandrel"], "torch": result["torch"]}
    return {model["key"]: model | versions for model in result["models"]}


def _base(key: str) -> str:
    return key.replace("_old", "").replace("_st", "")


def _sizes(key: str) -> list[tuple[int, int]]:
    """Two input sizes (H, W) the net takes as they are: multiples of its window / pixel-unshuffle (odd otherwise)."""
    if key in SPANDREL_ONLY:
        return SPANDREL_ONLY[key][2]
    arch = REFERENCE_ARCHS[_base(key)]
    m = getattr(arch, "window", getattr(arch, "unshuffle", 1))
    return [(3 * m, 5 * m), (4 * m, 2 * m)] if m > 1 else [(13, 11), (8, 17)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(job, {key: spandrel's report}) for every reference file, spandrel's outputs on two images each."""
    folder = tmp_path_factory.mktemp("spandrel")
    files = write_tiny_upscalers(folder / "files", REFERENCE_ARCHS)
    files["compact_lrelu"] = write_tiny_upscalers(folder / "lrelu", {"compact_lrelu": TINY_ARCHS["compact_lrelu"]})[
        "compact_lrelu"
    ]
    make = []
    for key, (architecture, kwargs, _) in SPANDREL_ONLY.items():
        files[key] = folder / f"{key}.pth"
        make.append({"key": key, "architecture": architecture, "kwargs": kwargs, "file": str(files[key]),
                     "flipped": str(folder / f"{key}-flipped.pth")})  # fmt: skip
    rng = np.random.default_rng(0)
    models = []
    for key, path in files.items():
        sizes = _sizes(key) if key != "compact_lrelu" else [(8, 8)]
        inputs = [folder / f"{key}-in{i}.npy" for i in range(len(sizes))]
        for (h, w), name in zip(sizes, inputs, strict=True):
            np.save(name, rng.random((1, 3, h, w), dtype=np.float32))
        models.append({"key": key, "file": str(path), "official": str(folder / f"{key}-official.safetensors"),
                       "inputs": [str(p) for p in inputs],
                       "outputs": [str(folder / f"{key}-out{i}.npy") for i in range(len(sizes))]})  # fmt: skip
    job = {"make": make, "models": models}
    reference = job, run_spandrel(job, folder)
    yield reference
    record = os.environ.get("SDRT_SPANDREL_RECORD")  # benchmarks/results/upscaler-spandrel-parity.json
    if record and MEASURED:
        write_record(Path(record), reference[1])


def write_record(path: Path, spandrel: dict) -> None:
    """The measured differences as a benchmarks/results file (one row per model; docs/benchmarks/hires.md)."""
    import datetime

    from sdrt.bench.machine import describe_machine

    versions = next(iter(spandrel.values()), {})
    rows = [{"model": key, **{k: v for k, v in figures.items() if k not in ("sizes", "spandrel", "torch")},
             "sizes": ", ".join(f"{h}x{w}" for h, w in figures.get("sizes", []))}
            for key, figures in MEASURED.items()]  # fmt: skip
    report = {"benchmark": "upscaler_spandrel_parity", "date": datetime.date.today().isoformat(),
              "command": "SDRT_SPANDREL_PYTHON=/work/spandrel-venv/bin/python SDRT_SPANDREL_RECORD=benchmarks/results/"
                         "upscaler-spandrel-parity.json pytest tests/test_upscale_spandrel.py",
              "machine": describe_machine(),
              "reference": {"spandrel": versions.get("spandrel"), "torch": versions.get("torch")},
              "unit": "max |sdrt graph (ONNX Runtime CPU) - spandrel torch module| on the raw outputs; tolerance 1/255",
              "rows": rows}  # fmt: skip
    path.write_text(json.dumps(report, indent=2) + "\n")


@pytest.fixture(scope="module")
def exported(reference, tmp_path_factory):
    """{key: sdrt's export folder} of each official file spandrel completed (sdrt's own torch modules)."""
    from sdrt.export.upscaler import export_upscaler

    job, _ = reference
    root = tmp_path_factory.mktemp("sdrt-exports")
    done = {}
    for model in job["models"]:
        if model["key"] in MODELS:
            export_upscaler(model["official"], root / model["key"])
            done[model["key"]] = root / model["key"]
    return done


def _model_job(job: dict, key: str) -> dict:
    return next(model for model in job["models"] if model["key"] == key)


def _graph_outputs(folder: Path, inputs: list[str]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / UPSCALER_MODEL), providers=["CPUExecutionProvider"])
    return [session.run(None, {UPSCALER_INPUT: np.load(name)})[0] for name in inputs]


@pytest.mark.parametrize("key", MODELS)
def test_spandrel_detects_the_same_architecture(reference, exported, key):
    _, spandrel = reference
    assert "error" not in spandrel[key], spandrel[key].get("error")
    manifest = json.loads((exported[key] / "upscaler.json").read_text())
    assert spandrel[key]["architecture_name"] == manifest["architecture"] == REFERENCE_ARCHS[_base(key)].name
    assert spandrel[key]["scale"] == manifest["scale"] == REFERENCE_ARCHS[_base(key)].scale
    assert spandrel[key]["in_channels"] == manifest["in_channels"]
    assert spandrel[key]["out_channels"] == manifest["out_channels"]


@pytest.mark.parametrize("key", MODELS)
def test_graph_matches_spandrel(reference, exported, key):
    job, spandrel = reference
    model_job = _model_job(job, key)
    differences = []
    for got, name in zip(_graph_outputs(exported[key], model_job["inputs"]), model_job["outputs"], strict=True):
        want = np.load(name)
        assert got.shape == want.shape
        assert want.std() > 0.05  # the outputs are not flat (a test on a constant image could not fail)
        differences.append(float(np.abs(got - want).max()))
    report = spandrel[key]
    MEASURED.setdefault(key, {}).update({"architecture": report["architecture_name"], "scale": report["scale"],
                                         "sizes": _sizes(key), "max_difference": differences,
                                         "spandrel": report["spandrel"], "torch": report["torch"]})  # fmt: skip
    assert max(differences) <= ONE_LEVEL


@pytest.mark.parametrize("key", ["rrdb_x4", "rrdb_x2", "compact_prelu", "swinir_x4", "swin2sr_x2", "hat_x4"])
def test_perturbed_weight_differs_from_spandrel(reference, tmp_path, key):
    """Can-fail twin: the same file with its first convolution's 3x3 kernels flipped left-right is past 1/255."""
    from safetensors.torch import load_file, save_file

    from sdrt.export.upscaler import export_upscaler

    job, _ = reference
    model_job = _model_job(job, key)
    state = load_file(model_job["official"])
    first = "body.0.weight" if "body.0.weight" in state and "conv_first.weight" not in state else "conv_first.weight"
    state[first] = state[first].flip(-1).contiguous()
    save_file(state, str(tmp_path / "perturbed.safetensors"))
    export_upscaler(tmp_path / "perturbed.safetensors", tmp_path / "out")
    got = _graph_outputs(tmp_path / "out", model_job["inputs"])[0]
    difference = float(np.abs(got - np.load(model_job["outputs"][0])).max())
    MEASURED.setdefault(key, {})["flipped_kernel_twin"] = difference
    assert difference > ONE_LEVEL


def test_spandrel_refuses_compact_with_leaky_relu(reference):
    """sdrt also exports SRVGGNetCompact with LeakyReLU (no activation weights); spandrel detects no such file."""
    _, spandrel = reference
    assert spandrel["compact_lrelu"]["error"].startswith("UnsupportedModelError")


def export_in_spandrel_venv(source: Path, out: Path) -> dict:
    """`sdrt export-upscaler SOURCE -o OUT` run by the spandrel venv's Python on this checkout; the manifest."""
    env = os.environ | {"PYTHONPATH": str(SRC)}
    done = subprocess.run([SPANDREL_PYTHON, "-m", "sdrt.cli", "export-upscaler", str(source), "-o", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "through spandrel" in done.stderr
    return json.loads((out / "upscaler.json").read_text())


@pytest.fixture(scope="module")
def spandrel_exports(reference, tmp_path_factory):
    """{key: export folder} of each spandrel-only tiny net, exported through spandrel in its venv."""
    job, _ = reference
    root = tmp_path_factory.mktemp("through-spandrel")
    return {key: export_in_spandrel_venv(Path(_model_job(job, key)["file"]), root / key) and root / key
            for key in SPANDREL_ONLY}  # fmt: skip


@pytest.mark.parametrize("key", SPANDREL_ONLY)
def test_export_through_spandrel_matches_spandrel(reference, spandrel_exports, key):
    job, spandrel = reference
    assert "error" not in spandrel[key], spandrel[key].get("error")
    manifest = json.loads((spandrel_exports[key] / "upscaler.json").read_text())
    assert manifest["architecture"] == spandrel[key]["architecture_name"] == SPANDREL_ONLY[key][0]
    assert manifest["scale"] == spandrel[key]["scale"]
    assert manifest["source"]["loader"] == f"spandrel {spandrel[key]['spandrel']}"
    model_job = _model_job(job, key)
    differences = []
    for got, name in zip(_graph_outputs(spandrel_exports[key], model_job["inputs"]), model_job["outputs"], strict=True):
        want = np.load(name)
        assert got.shape == want.shape
        assert want.std() > 0.05
        differences.append(float(np.abs(got - want).max()))
    MEASURED.setdefault(key, {}).update({"architecture": manifest["architecture"], "scale": manifest["scale"],
                                         "sizes": _sizes(key), "max_difference": differences,
                                         "exported_through": manifest["source"]["loader"]})  # fmt: skip
    assert max(differences) <= ONE_LEVEL


def test_runtime_upscales_a_spandrel_export_as_spandrel(reference, spandrel_exports):
    """The runtime (A1111's BGR feeding, padding, clamping) on the DAT export gives spandrel's image within 1/255."""
    job, _ = reference
    model_job = _model_job(job, "dat_x2")
    x = np.load(model_job["inputs"][0])[0].transpose(1, 2, 0)  # (H, W, 3) as the model sees it (BGR)
    want = np.clip(np.load(model_job["outputs"][0])[0].transpose(1, 2, 0)[..., ::-1], 0, 1)  # back to RGB
    got = UpscalerModel(spandrel_exports["dat_x2"]).run(np.ascontiguousarray(x[..., ::-1]))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= ONE_LEVEL


def test_spandrel_export_tiled_matches_untiled(spandrel_exports):
    """A1111's grid tiling (24 px tiles, overlap 8) of the DAT export against one run: the same seam tolerance as
    sdrt's own transformers (test_upscale.py); without overlap the seams show (can-fail twin)."""
    model = UpscalerModel(spandrel_exports["dat_x2"])
    pixels = np.random.default_rng(1).random((40, 56, 3), dtype=np.float32)
    whole = model.run(pixels)
    error = {ov: np.abs(upscale_tiled(model.run, pixels, model.scale, 24, ov) - whole) for ov in (0, 8)}
    assert error[8].max() <= 0.1 and error[8].mean() <= ONE_LEVEL
    assert error[0].max() > 0.15  # measured: overlap 8 0.053 (mean 0.0026), overlap 0 0.59


def test_runtime_pads_up_to_spandrels_minimum_size(spandrel_exports):
    """OmniSR needs 16 px (spandrel's size requirement; an 8 px input kills ONNX Runtime with SIGFPE): the manifest
    records it and the runtime pads smaller images up to it, cropping the output back."""
    model = UpscalerModel(spandrel_exports["omnisr_x2"])
    assert model.manifest["minimum_size"] == 16
    small = np.random.default_rng(0).random((8, 5, 3), dtype=np.float32)
    got = model.run(small)
    assert got.shape == (16, 10, 3) and np.isfinite(got).all() and got.std() > 0.01


def test_export_through_spandrel_can_fail(reference, tmp_path):
    """Can-fail twin: the DAT file with its first convolution's kernels flipped, exported through spandrel, is past
    1/255 from spandrel's output of the unflipped file."""
    job, _ = reference
    model_job = _model_job(job, "dat_x2")
    export_in_spandrel_venv(Path(model_job["file"]).with_name("dat_x2-flipped.pth"), tmp_path / "out")
    got = _graph_outputs(tmp_path / "out", model_job["inputs"])[0]
    difference = float(np.abs(got - np.load(model_job["outputs"][0])).max())
    MEASURED.setdefault("dat_x2", {})["flipped_kernel_twin"] = difference
    assert difference > ONE_LEVEL


def test_without_spandrel_the_file_is_refused_naming_the_extra(reference, tmp_path):
    """In sdrt's own environment (no spandrel), a DAT file is refused with the way to install the spandrel path."""
    from sdrt.export import upscaler_spandrel
    from sdrt.export.upscaler import export_upscaler

    if upscaler_spandrel.available():
        pytest.skip("spandrel is installed in this environment: the file exports through it")
    job, _ = reference
    with pytest.raises(ModelError, match=r"DAT \(Dual Aggregation Transformer\) is not supported.*sdrt\[spandrel\]"):
        export_upscaler(_model_job(job, "dat_x2")["file"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
