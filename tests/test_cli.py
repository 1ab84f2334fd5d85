"""CLI: generate writes PNGs with A1111 infotext; every bad input is one clear line, exit code 2, nothing written."""

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from sdrt.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_writes_pngs_with_infotext(tiny_sd, tmp_path, capsys):
    _, model = tiny_sd
    code, out, err = run_cli(
        capsys,
        "generate",
        "a grey squirrel",
        "-m",
        model,
        "--negative-prompt",
        "blurry",
        "--steps",
        3,
        "--seed",
        12,
        "--batch-size",
        2,
        "--sampler",
        "DPM++ 2M Karras",
        "--cfg-scale",
        7.5,
        "-o",
        tmp_path,
    )
    assert code == 0, err
    paths = out.split()
    assert [p.split("/")[-1] for p in paths] == ["00000-12.png", "00001-13.png"]
    params = Image.open(paths[1]).info["parameters"]
    lines = params.split("\n")
    assert lines[0] == "a grey squirrel" and lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith(
        "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 13, Size: 64x64, Model hash: "
    )
    code, out, _ = run_cli(capsys, "generate", "x", "-m", model, "--steps", 1, "-o", tmp_path)
    assert out.split()[0].split("/")[-1].startswith("00002-")


def test_info_prints_manifest(tiny_sd, capsys):
    code, out, _ = run_cli(capsys, "info", tiny_sd[1])
    assert code == 0 and json.loads(out)["family"] == "sd1"


BAD_GENERATE = [
    (["--width", 65], "width", "multiple of 8"),
    (["--height", 4096], "height", "2048"),
    (["--width", 32], "width", "64"),
    (["--steps", 0], "steps", "integer from 1"),
    (["--cfg-scale", "nan"], "cfg_scale", "finite"),
    (["--cfg-scale", -1], "cfg_scale", "from 0"),
    (["--sampler", "Euler z"], "sampler", "DPM++ 2M"),
    (["--scheduler", "fancy"], "scheduler", "karras"),
    (["--timestep-spacing", "even"], "timestep_spacing", "trailing"),
    (["--guidance-rescale", 2], "guidance_rescale", "from 0 to 1"),
    (["--batch-size", 0], "batch_size", "integer from 1"),
    (["--batch-count", -2], "batch_count", "integer from 1"),
    (["--seed", -5], "seed", "-1"),
]


@pytest.mark.parametrize(("extra", "field", "allowed"), BAD_GENERATE, ids=[b[1] + str(b[0][1]) for b in BAD_GENERATE])
def test_bad_generate_options(tiny_sd, tmp_path, capsys, extra, field, allowed):
    code, out, err = run_cli(capsys, "generate", "a cat", "-m", tiny_sd[1], "-o", tmp_path / "out", *extra)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert field in err and str(extra[1]) in err and allowed in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def broken_model(tiny_sd, tmp_path, how):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd[1], model)
    if how == "missing":
        shutil.rmtree(model)
    elif how == "corrupt manifest":
        (model / "model.json").write_text("{not json")
    elif how == "other version":
        data = json.loads((model / "model.json").read_text())
        (model / "model.json").write_text(json.dumps({**data, "version": 99}))
    elif how == "no manifest":
        (model / "model.json").unlink()
    elif how == "truncated onnx":
        onnx_file = model / "unet" / "model.onnx"
        onnx_file.write_bytes(onnx_file.read_bytes()[:5000])
    elif how == "missing onnx":
        (model / "vae_decoder" / "model.onnx").unlink()
    return model


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("missing", "does not exist"),
        ("corrupt manifest", "not valid JSON"),
        ("other version", "version 99"),
        ("no manifest", "model.json"),
        ("truncated onnx", "unet"),
        ("missing onnx", "vae_decoder"),
    ],
)
def test_bad_model_folder(tiny_sd, tmp_path, capsys, how, expected):
    model = broken_model(tiny_sd, tmp_path, how)
    code, _, err = run_cli(capsys, "generate", "a cat", "-m", model, "-o", tmp_path / "out")
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err and expected in err
    assert not (tmp_path / "out").exists()


def test_bad_input_in_a_real_process_prints_no_traceback(tiny_sd, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sdrt.cli", "generate", "cat", "-m", str(tiny_sd[1]), "--width", "100"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "sdrt generate: error: width: got 100; allowed: a multiple of 8 from 64 to 2048"


def test_generate_from_a_diffusers_folder_exports_once_into_the_cache(tiny_sd, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "cache"))
    source = tiny_sd[1].parent / "diffusers"
    args = ("generate", "a cat", "-m", source, "--steps", 2, "--seed", 5, "-o", tmp_path / "out")
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "exporting" in err
    exported = list((tmp_path / "cache" / "models").iterdir())
    exported = [p for p in exported if not p.name.startswith(".")]  # lock files beside the entries
    assert len(exported) == 1 and (exported[0] / "model.json").is_file()
    code, out2, err = run_cli(capsys, *args)
    assert code == 0 and "exporting" not in err  # reused
    first, second = (Image.open(p.strip()) for p in (out, out2))
    assert first.tobytes() == second.tobytes()


def test_txt2img_on_an_inpainting_model_is_refused_clearly(tiny_sd, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd[1], model)
    data = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**data, "unet_in_channels": 9}))
    code, _, err = run_cli(capsys, "generate", "a cat", "-m", model, "-o", tmp_path / "out")
    assert code == 2 and "inpainting model" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
