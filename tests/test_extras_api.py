"""The upscaler routes of `sdrt serve --upscaler-dir` (A1111's extras and listings), hires fix over HTTP, and the
CLI's `sdrt upscale` / `sdrt export-upscaler` / `sdrt generate --hires`."""

import json

import numpy as np
import pytest
from server_fixture import SMALL, TEST_SERVER_ARGS, decode_b64, gradient, png_b64, running_server

from sdrt.cli import main

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def upscale_server(tiny_sd, tiny_upscalers, tmp_path_factory):
    folder = tiny_upscalers["rrdb_x4"].parent
    with running_server(tiny_sd[1], tmp_path_factory.mktemp("logs"), *TEST_SERVER_ARGS, "--upscaler-dir",
                        str(folder), "--max-pixels", str(160 * 160)) as server:  # fmt: skip
        yield server


def test_listings(upscale_server):
    names = [u["name"] for u in upscale_server.get("/sdapi/v1/upscalers").json()]
    assert names[:3] == ["None", "Lanczos", "Nearest"] and "rrdb_x4" in names and "compact_lrelu" in names
    modes = [m["name"] for m in upscale_server.get("/sdapi/v1/latent-upscale-modes").json()]
    assert modes[0] == "Latent" and "Latent (nearest-exact)" in modes and len(modes) == 6
    models = {m["name"]: m["scale"] for m in upscale_server.get("/sdapi/v1/realesrgan-models").json()}
    assert models["rrdb_x4"] == 4 and models["rrdb_x2"] == 2


def test_extra_single_image(upscale_server):
    fields = {"image": png_b64(gradient(40, 24)), "upscaler_1": "rrdb_x4", "upscaling_resize": 2}
    res = upscale_server.post("/sdapi/v1/extra-single-image", fields)
    assert res.status_code == 200, res.text
    body = res.json()
    assert decode_b64(body["image"]).size == (80, 48)  # x4 model once, then Lanczos to 2x (A1111's Upscaler)
    assert "Postprocess upscaler: rrdb_x4" in body["html_info"]
    res = upscale_server.post("/sdapi/v1/extra-single-image", {
        "image": png_b64(gradient(40, 24)), "resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 64,
        "upscaler_1": "Lanczos", "upscaler_2": "Nearest", "extras_upscaler_2_visibility": 0.5})  # fmt: skip
    assert res.status_code == 200 and decode_b64(res.json()["image"]).size == (64, 64)  # cropped to the size


def test_extra_batch_images(upscale_server):
    images = [{"data": png_b64(gradient(16, 16)), "name": f"{i}.png"} for i in range(2)]
    res = upscale_server.post("/sdapi/v1/extra-batch-images", {"imageList": images, "upscaler_1": "Nearest"})
    assert res.status_code == 200, res.text
    out = [decode_b64(b) for b in res.json()["images"]]
    assert [im.size for im in out] == [(32, 32)] * 2
    assert np.array_equal(np.asarray(out[0])[::2, ::2], np.asarray(gradient(16, 16)))


@pytest.mark.parametrize("fields, field", [
    ({"upscaler_1": "4x-UltraSharp"}, "upscaler_1"), ({"upscaling_resize": 0}, "upscaling_resize"),
    ({"gfpgan_visibility": 0.5}, "gfpgan_visibility"), ({"image": "bm90IGFuIGltYWdl"}, "image"),
    ({"upscaling_resize": 8}, "upscaling_resize"),  # of a 600 px image: 4800 px sides, past the 4096^2 pixels
])  # fmt: skip
def test_extras_errors(upscale_server, fields, field):
    image = gradient(600, 600) if fields.get("upscaling_resize") == 8 else gradient(40, 24)
    res = upscale_server.post("/sdapi/v1/extra-single-image", {"image": png_b64(image), **fields})
    assert res.status_code in (400, 422), res.text
    assert field in res.text
    if field == "upscaler_1" and fields[field] == "4x-UltraSharp":
        assert "rrdb_x4" in res.text  # the installed ones are listed


def test_txt2img_hires(upscale_server):
    res = upscale_server.post("/sdapi/v1/txt2img", {"prompt": "a cat", **SMALL, "seed": 4, "enable_hr": True,
                                                    "hr_scale": 2, "hr_upscaler": "rrdb_x2",
                                                    "hr_second_pass_steps": 2, "denoising_strength": 0.5})  # fmt: skip
    assert res.status_code == 200, res.text
    body = res.json()
    image = decode_b64(body["images"][0])
    assert image.size == (128, 128)
    info = json.loads(body["info"])["infotexts"][0]
    for entry in (
        "Size: 64x64",
        "Hires upscale: 2",
        "Hires upscaler: rrdb_x2",
        "Hires steps: 2",
        "Denoising strength: 0.5",
    ):
        assert entry in info


@pytest.mark.parametrize("fields, field, listed", [
    ({"hr_upscaler": "4x-UltraSharp"}, "hr_upscaler", "Latent (bicubic)"),
    ({"hr_scale": 4}, "hr_scale", "25600 pixels"),  # 256 x 256 > --max-pixels 160 * 160
    ({"hr_checkpoint_name": "other.safetensors"}, "hr_checkpoint_name", ""),
])  # fmt: skip
def test_txt2img_hires_errors(upscale_server, fields, field, listed):
    res = upscale_server.post("/sdapi/v1/txt2img", {"prompt": "a cat", **SMALL, "enable_hr": True, **fields})
    assert res.status_code == 422, res.text
    assert field in res.text and listed in res.text


def test_cli_upscale_and_export(tiny_upscaler_files, tiny_upscalers, tmp_path, capsys):
    gradient(20, 12).save(tmp_path / "in.png")
    assert main(["upscale", str(tmp_path / "in.png"), "-u", str(tiny_upscalers["compact_prelu"]),
                 "-o", str(tmp_path / "out")]) == 0  # fmt: skip
    from PIL import Image

    assert Image.open(tmp_path / "out" / "in-x4.png").size == (80, 48)
    assert main(["upscale", str(tmp_path / "in.png"), "-u", "nope", "--upscaler-dir",
                 str(tiny_upscalers["rrdb_x4"].parent)]) == 2  # fmt: skip
    assert "rrdb_x4" in capsys.readouterr().err
    assert main(["export-upscaler", str(tmp_path / "in.png"), "-o", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    assert main(["export-upscaler", str(tiny_upscaler_files["rrdb_x2"]), "-o", str(tmp_path / "x2"), "--name",
                 "My x2"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "x2" / "upscaler.json").read_text())["name"] == "My x2"


def test_cli_generate_hires_and_from_png(tiny_sd, tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", "a cat", "-m", str(tiny_sd[1]), "--width", "64", "--height", "64", "--steps", "3",
                 "--seed", "2", "--hires", "--hires-scale", "1.5", "--hires-steps", "2", "--strength", "0.5",
                 "--hires-upscaler", "Latent (bicubic)", "-o", str(out)]) == 0  # fmt: skip
    from PIL import Image

    first = sorted(out.iterdir())[0]
    assert Image.open(first).size == (96, 96)
    assert main(["generate", "-m", str(tiny_sd[1]), "--from-png", str(first), "-o", str(out)]) == 0
    second = sorted(out.iterdir())[1]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
