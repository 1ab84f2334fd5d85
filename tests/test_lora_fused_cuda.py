"""LoRAs on the fused CUDA graph variant (`sdrt optimize --target cuda`, fp16), checked on the CPU: its graphs need
CUDA kernels to run, so the test compares weights. The runtime's merge into the fused graph (engines/fused_weights.py:
q, k, v packed per head for MultiHeadAttention, NhwcConv's OHWI filters, the rest as they are) must give the weights
of a fused graph made from an export with the same LoRAs baked in (`sdrt export --lora`), within fp16 rounding.
The twin (one packed weight's slot read wrongly) does not. tests/test_lora_fused.py::test_fused_cuda_takes_loras
runs the images on a GPU (benchmarks/gpu_check.sh).
"""

import shutil

import numpy as np
import pytest
from test_lora import loras  # noqa: F401  (the test LoRA files: a module fixture)

from sdrt.engines.fused_weights import FusedPlaces
from sdrt.engines.onnx_weights import OnnxWeights, read_initializers
from sdrt.engines.weight_merge import merged_value
from sdrt.export.bake import bake_loras
from sdrt.export.optimize import optimize
from sdrt.runtime.lora import Loras
from sdrt.runtime.manifest import Manifest

PARTS = ("unet", "text_encoder")
LORAS = (("locon", 0.8), ("loha", 0.7), ("style", 0.6))  # low-rank attention + convs, whole arrays, text encoder


@pytest.fixture(scope="module")
def fused_pair(tiny_sd, loras, tmp_path_factory):  # noqa: F811
    """(plain export, LoRAs baked in), each with its fused CUDA UNet and text encoder."""
    root = tmp_path_factory.mktemp("fused_cuda")
    folders = root / "plain", root / "baked"
    for folder in folders:
        shutil.copytree(tiny_sd[1], folder, ignore=shutil.ignore_patterns(".ort-cache", "*.weights.json"))
    files = {path.stem: path for path in loras[0].rglob("*.safetensors")}
    bake_loras(folders[1], [(files[name], weight, weight) for name, weight in LORAS])
    for folder in folders:
        optimize(folder, "cuda", models=list(PARTS), verify=False, progress=False)
    return folders


def runtime_merge(plain, loras_folder, part: str, wrong_slot: bool = False) -> dict:
    """{fused initializer: merged value} the runtime writes into PLAIN's fused PART for LORAS."""
    manifest = Manifest.load(plain)
    index = Loras(manifest, {}).load_dir(loras_folder)
    for name, _ in LORAS:
        index.file(name)
    signature = tuple((name, weight) for name, weight in LORAS if part in index.targets[name])
    updates = index.updates(part, signature)
    export_file = manifest.model_path(part)
    places = FusedPlaces(export_file, export_file.with_name("model.cuda.onnx"))
    places.place(list(updates))
    if wrong_slot:  # the twin: q read as k (and k as v...)
        packed = next(n for n, p in places.places.items() if p and p[1] == "heads")
        place = places.places[packed]
        places.places[packed] = [*place[:4], (place[4] + 1) % place[2]]
    translated = places.translate(updates)
    base = read_initializers(places.fused_file, translated)
    return {name: merged_value(base[name], terms) for name, terms in translated.items()}, places


def changed(plain_file, baked_file) -> dict:
    """{initializer: baked value} of the initializers whose values the bake changed (same names in both graphs)."""
    plain, baked = OnnxWeights(plain_file), OnnxWeights(baked_file)
    try:
        assert set(plain.initializers) == set(baked.initializers)
        return {n: baked.read(n) for n in baked.initializers if baked.raw(n) != plain.raw(n)}
    finally:
        plain.close()
        baked.close()


def worst_error(merged: dict, want: dict, base: dict) -> float:
    """max |merged - baked| over the changed weights, in units of fp16 rounding: the spacing of fp16 numbers at the
    base value (the fused graph's base is the export's rounded to fp16) plus at the baked value (rounded once more)."""
    worst = 0.0
    for name, value in want.items():
        ulp = sum(np.spacing(np.abs(v).astype(np.float16)).astype(np.float32) for v in (value, base[name]))
        worst = max(worst, float((np.abs(merged[name].astype(np.float32) - value.astype(np.float32)) / ulp).max()))
    return worst


@pytest.mark.parametrize("part", PARTS)
def test_runtime_merge_equals_baked_then_fused(fused_pair, loras, part):  # noqa: F811
    plain, baked = fused_pair
    fused_file = f"{part}/model.cuda.onnx"
    want = changed(plain / fused_file, baked / fused_file)
    merged, places = runtime_merge(plain, loras[0], part)
    assert set(want) <= set(merged), f"weights the bake changed that the runtime does not: {set(want) - set(merged)}"
    kinds = {p[1] for p in places.places.values() if p}
    if part == "unet":
        assert {"heads", "ohwi"} <= kinds, kinds
    base = read_initializers(plain / fused_file, merged)
    assert worst_error(merged, want, base) <= 1.5, "more than fp16 rounding apart"  # measured 0.97, 0.94
    for name in set(merged) - set(want):  # a term that rounds to nothing in fp16: the base unchanged
        assert np.array_equal(merged[name], base[name])


def test_a_wrong_head_slot_is_caught(fused_pair, loras):  # noqa: F811
    plain, baked = fused_pair
    want = changed(plain / "unet/model.cuda.onnx", baked / "unet/model.cuda.onnx")
    merged, _ = runtime_merge(plain, loras[0], "unet", wrong_slot=True)
    assert worst_error(merged, want, read_initializers(plain / "unet/model.cuda.onnx", merged)) > 100
