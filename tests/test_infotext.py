"""Infotext read back: A1111's parser rules, ComfyUI PNGs, and `--from-png` regenerating identical pixels."""

import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdrt.cli import main
from sdrt.runtime.errors import InvalidOption
from sdrt.runtime.infotext import comfyui_infotext, generate_kwargs, parse_infotext, read_parameters

A1111_EXAMPLE = (
    "masterpiece, (best quality:1.2), a cat\n"
    "wearing a hat\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567890, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "detail: 0123abcd, x: 1", '
    "Clip skip: 2, ENSD: 31337, Version: v1.10.1"
)


def test_parse_a1111_infotext():
    p = parse_infotext(A1111_EXAMPLE)
    assert p["Prompt"] == "masterpiece, (best quality:1.2), a cat\nwearing a hat"
    assert p["Negative prompt"] == "blurry, lowres"
    assert (p["Steps"], p["Sampler"], p["Schedule type"], p["CFG scale"]) == ("28", "DPM++ 2M", "Karras", "6.5")
    assert (p["Size-1"], p["Size-2"], p["Clip skip"], p["ENSD"]) == ("512", "768", "2", "31337")
    assert p["Lora hashes"] == "detail: 0123abcd, x: 1"  # JSON-quoted value with commas and colons
    assert p["RNG"] == "GPU" and p["Emphasis"] == "Original"  # A1111's defaults for absent keys
    kwargs = generate_kwargs(p)
    assert kwargs["width"] == 512 and kwargs["height"] == 768 and kwargs["clip_skip"] == 2 and kwargs["rng"] == "gpu"


def test_parse_without_parameters_line_keeps_everything_as_prompt():
    p = parse_infotext("just a prompt, with: a colon")
    assert p["Prompt"] == "just a prompt, with: a colon" and p["Negative prompt"] == ""


@pytest.mark.parametrize(
    "text", ["", "\n\n", "Steps: x, Seed: y, Size: z", "a\x00b\nNegative prompt:", "Size: 9x", "::::"]
)
def test_parser_never_raises_on_text(text):
    assert isinstance(parse_infotext(text), dict)


def test_bad_values_name_the_field():
    with pytest.raises(InvalidOption, match="Steps"):
        generate_kwargs(parse_infotext("a\nSteps: many, Sampler: Euler, Seed: 1"))
    with pytest.raises(InvalidOption, match="RNG"):
        generate_kwargs(parse_infotext("a\nSteps: 2, Sampler: Euler, Seed: 1, RNG: quantum"))


def test_infotext_round_trip_gives_identical_pixels(tiny_pipeline, tmp_path):
    from sdrt.runtime.image import save_png

    options = dict(
        negative_prompt="blurry, (ugly:1.3)",
        width=64,
        height=72,
        steps=5,
        cfg_scale=6.5,
        sampler="DPM++ 2M",
        scheduler="karras",
        seed=4242,
        subseed=77,
        subseed_strength=0.3,
        clip_skip=2,
        rng="nv",
        progress=False,
    )
    image = tiny_pipeline.generate("a (red:1.3) cat, [blue:green:0.4] sky", **options)[0]
    text = image.info["parameters"]
    assert "Clip skip: 2" in text and "Schedule type: Karras" in text and "RNG: NV" in text
    kwargs = generate_kwargs(parse_infotext(text))
    again = tiny_pipeline.generate(kwargs.pop("prompt"), progress=False, **kwargs)[0]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(image))
    assert again.info["parameters"] == text
    # through the CLI, from the PNG file
    path = save_png(image, tmp_path / "in.png")
    model = tiny_pipeline.manifest.folder
    assert main(["generate", "--from-png", str(path), "-m", str(model), "-o", str(tmp_path / "out")]) == 0
    (out,) = (tmp_path / "out").glob("*.png")
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(image))
    # an option given on the command line replaces the PNG's
    assert (
        main(["generate", "--from-png", str(path), "-m", str(model), "-o", str(tmp_path / "o2"), "--steps", "3"]) == 0
    )
    (changed,) = (tmp_path / "o2").glob("*.png")
    assert "Steps: 3," in Image.open(changed).info["parameters"]


def comfy_png(path, graph):
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(graph) if not isinstance(graph, str) else graph)
    info.add_text("workflow", json.dumps({"nodes": []}))
    Image.new("RGB", (64, 64), (90, 120, 200)).save(path, pnginfo=info)
    return path


COMFY_GRAPH = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 156680208700286,
            "steps": 4,
            "cfg": 8.0,
            "sampler_name": "euler_ancestral",
            "scheduler": "karras",
            "denoise": 1.0,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat, photo", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
}


def test_comfyui_png_reads_as_parameters(tmp_path, capsys, tiny_pipeline):
    path = comfy_png(tmp_path / "comfy.png", COMFY_GRAPH)
    text, where = read_parameters(Image.open(path))
    assert where == "ComfyUI prompt graph"
    p = parse_infotext(text)
    assert (p["Prompt"], p["Negative prompt"], p["Sampler"], p["Schedule type"]) == (
        "a red cat, photo",
        "blurry",
        "Euler a",
        "Karras",
    )
    assert main(["info", str(path)]) == 0 and "a red cat, photo" in capsys.readouterr().out
    # its seed is past A1111's 32-bit range: --from-png refuses it clearly, and a given --seed fixes that
    model = str(tiny_pipeline.manifest.folder)
    assert main(["generate", "--from-png", str(path), "-m", model, "-o", str(tmp_path / "o")]) == 2
    assert "seed" in capsys.readouterr().err
    assert main(["generate", "--from-png", str(path), "-m", model, "-o", str(tmp_path / "o"), "--seed", "5"]) == 0


@pytest.mark.parametrize("graph", ["{not json", "[1, 2]", {"1": {"class_type": "Other", "inputs": {}}}, {"3": 5}])
def test_odd_comfyui_graphs_do_not_crash(tmp_path, capsys, graph):
    path = comfy_png(tmp_path / "odd.png", graph)
    assert read_parameters(Image.open(path))[0] is None
    assert comfyui_infotext(graph if isinstance(graph, str) else json.dumps(graph)) is None
    assert main(["info", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: ")  # one line saying what was (not) found


def test_image_without_parameters(tmp_path, capsys, tiny_pipeline):
    path = tmp_path / "plain.png"
    Image.new("RGB", (64, 64)).save(path)
    assert main(["info", str(path)]) == 0 and "no generation parameters" in capsys.readouterr().out
    model = str(tiny_pipeline.manifest.folder)
    assert main(["generate", "--from-png", str(path), "-m", model, "-o", str(tmp_path / "o")]) == 2
    assert "--from-png" in capsys.readouterr().err
    assert main(["generate", "-m", model, "-o", str(tmp_path / "o")]) == 2  # no prompt and no --from-png
