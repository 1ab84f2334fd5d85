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
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tiny_upscalers import REFERENCE_ARCHS, TINY_ARCHS, write_tiny_upscalers

from sdrt.runtime.upscale import UPSCALER_INPUT, UPSCALER_MODEL

SPANDREL_PYTHON = os.environ.get("SDRT_SPANDREL_PYTHON", "")
WORKER = Path(__file__).with_name("spandrel_reference.py")
WHY_SKIPPED = ("no spandrel reference venv: make it with benchmarks/make-spandrel-venv.sh and set "
               "SDRT_SPANDREL_PYTHON=/work/spandrel-venv/bin/python")  # fmt: skip
pytestmark = [pytest.mark.spandrel, pytest.mark.skipif(not Path(SPANDREL_PYTHON or "/nonexistent").is_file(),
                                                       reason=WHY_SKIPPED)]  # fmt: skip

ONE_LEVEL = 1 / 255
MODELS = [*REFERENCE_ARCHS, "rrdb_x4_old", "rrdb_x4_st"]
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
    job = {"models": models}
    yield job, run_spandrel(job, folder)
    record = os.environ.get("SDRT_SPANDREL_RECORD")
    if record and MEASURED:
        Path(record).write_text(json.dumps({"unit": "max |sdrt graph - spandrel torch| on [0, 1] outputs",
                                            "models": MEASURED}, indent=2) + "\n")  # fmt: skip


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
