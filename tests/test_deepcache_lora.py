"""DeepCache with a LoRA: sdrt's two DeepCache graphs with the LoRA merged (through each graph's weight map) against
the independent torch reference of test_deepcache.py run on diffusers' UNet with the same LoRA merged in torch
(tiny_lora.reference_merge: W += w (alpha / rank) up @ down, attention projections and convolutions, shallow and
deep layers alike). Tolerance: images within 2/255 (as test_parity.py); can-fail twin: another LoRA weight.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from test_deepcache import KW, PROMPT, generate, max_diff, reference_deepcache
from tiny_lora import file_keys, make_lora, reference_merge, text_layers, unet_layers

PIXEL_TOL = 2  # /255
BRANCH = 1
WEIGHT = 0.8


@pytest.fixture(scope="module")
def lora_case(tiny_sd, tmp_path_factory):
    """(model folder with DeepCache's graphs, LoRA folder, the LoRA's state dict)."""
    from safetensors.torch import save_file

    from sdrt.cli import main

    root = tmp_path_factory.mktemp("deepcache_lora")
    folder = root / "model"
    shutil.copytree(tiny_sd[1], folder)
    assert main(["export", str(tiny_sd[1].parent / "diffusers"), "-o", str(folder), "--deepcache", str(BRANCH)]) == 0
    pipe = tiny_sd[0]
    parts = {"unet": unet_layers(pipe.unet, convs=True), "text_encoder": text_layers(pipe.text_encoder)}
    state = make_lora(parts, "kohya", seed=6, scale=1.0)
    (root / "loras").mkdir()
    save_file(state, str(root / "loras" / "locon.safetensors"))
    return folder, root / "loras", state


def reference_with_lora(tiny_sd, state, weight, latents, interval):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd[1].parent / "diffusers", dtype=torch.float32)
    parts = {"unet": unet_layers(pipe.unet, convs=True), "text_encoder": text_layers(pipe.text_encoder)}
    keys = {k: m for k, m in file_keys(parts).items() if f"{k}.alpha" in state}
    reference_merge(keys, state, weight)
    return reference_deepcache(pipe, latents, interval)


def test_deepcache_with_lora_matches_the_reference(tiny_sd, lora_case):
    from sdrt import Pipeline

    folder, loras, state = lora_case
    assert json.loads((folder / "model.json").read_text())["models"]["unet_shallow"]["weight_map"]
    pipeline = Pipeline.load(folder, loras=loras)
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    prompt = f"{PROMPT} <lora:locon:{WEIGHT}>"
    images = pipeline.generate(prompt, latents=latents, progress=False, deepcache_interval=3, **KW)
    got = np.asarray(images[0])[None]
    _, want = reference_with_lora(tiny_sd, state, WEIGHT, latents, 3)
    assert max_diff(got, want) <= PIXEL_TOL
    assert "DeepCache interval: 3" in images[0].info["parameters"] and "<lora:locon:" in images[0].info["parameters"]
    # can-fail twins: the reference at another LoRA weight, and DeepCache without the LoRA, are far off
    _, twin = reference_with_lora(tiny_sd, state, 0.4, latents, 3)
    assert max_diff(got, twin) > 4 * PIXEL_TOL
    plain = generate(pipeline, latents, deepcache_interval=3)[0]
    assert max_diff(got, plain) > 4 * PIXEL_TOL
    # the LoRA off again: DeepCache's graphs hold their own weights back, exactly
    fresh = Pipeline.load(folder)
    assert max_diff(plain, generate(fresh, latents, deepcache_interval=3)[0]) == 0


def test_graphs_without_weight_maps_refuse_loras(lora_case, tmp_path):
    """DeepCache graphs exported before their weight maps: LoRAs with DeepCache refused by name; without DeepCache the
    LoRA still applies to the UNet."""
    from sdrt import Pipeline
    from sdrt.errors import InvalidOption

    folder, loras, _ = lora_case
    old = tmp_path / "model"
    shutil.copytree(folder, old)
    manifest = json.loads((old / "model.json").read_text())
    for graph in ("unet_deepcache", "unet_shallow"):
        del manifest["models"][graph]["weight_map"]
    (old / "model.json").write_text(json.dumps(manifest))
    pipeline = Pipeline.load(old, loras=loras)
    with pytest.raises(InvalidOption, match="deepcache_interval.*no weight maps"):
        pipeline.generate(f"{PROMPT} <lora:locon:1>", steps=2, deepcache_interval=3, progress=False)
    pipeline.generate(f"{PROMPT} <lora:locon:1>", steps=2, width=64, height=64, progress=False)


def test_deepcache_with_lora_on_openvino(lora_case):
    """OpenVINO takes LoRA weights as inputs, made replaceable before the first merge: DeepCache's graphs too."""
    pytest.importorskip("openvino")
    from sdrt import Pipeline

    folder, loras, _ = lora_case
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    prompt = f"{PROMPT} <lora:locon:{WEIGHT}>"
    images = {}
    for backend in ("cpu", "openvino-f32"):
        pipeline = Pipeline.load(folder, loras=loras, backend=backend)
        got = pipeline.generate(prompt, latents=latents, progress=False, deepcache_interval=3, **KW)
        images[backend] = np.asarray(got[0])[None]
    assert max_diff(images["openvino-f32"], images["cpu"]) <= PIXEL_TOL


def test_a_plain_lora_run_leaves_deepcache_graphs_unloaded(lora_case, tmp_path):
    """A LoRA merged for a plain image also goes into DeepCache's graphs; ONNX Runtime's first merge into a graph
    (its optimised-graph cache still empty) loads it to fill the cache. That session must not stay beside the plain
    UNet (full-size SDXL: a second 9.3 GiB UNet); the merged weights stay for the DeepCache run that follows."""
    from sdrt import Pipeline

    folder, loras, _ = lora_case
    fresh = tmp_path / "model"
    shutil.copytree(folder, fresh, ignore=shutil.ignore_patterns(".ort-cache"))  # no optimised graph cached yet
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    prompt = f"{PROMPT} <lora:locon:{WEIGHT}>"
    pipeline = Pipeline.load(fresh, loras=loras)
    pipeline.generate(prompt, latents=latents, progress=False, **KW)
    assert pipeline.engines["unet_deepcache"].session is None and pipeline.engines["unet"].session is not None
    got = pipeline.generate(prompt, latents=latents, progress=False, deepcache_interval=3, **KW)
    want = Pipeline.load(folder, loras=loras).generate(prompt, latents=latents, progress=False, deepcache_interval=3,
                                                        **KW)  # fmt: skip
    assert max_diff(np.asarray(got[0])[None], np.asarray(want[0])[None]) == 0
