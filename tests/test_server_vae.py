"""`sdrt serve --vae-dir DIR` (server/vaes.py): GET /sdapi/v1/sd-vae lists the folder as A1111 does, sd_vae (POST
options, override_settings) switches the VAE of the next images (exported on first use, with progress), the
images are the Python API's with that VAE (whose parity with diffusers tests/test_vae_swap.py checks), the
infotext and info name it; unknown names and VAEs of another family are 422s naming the field."""

import json
import os

import numpy as np
import pytest
from server_fixture import SMALL, decode_b64, running_server
from tiny_vae_files import tiny_swap_vae, write_vae_files

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def vae_dir(tiny_sd, tmp_path_factory):
    """swap.safetensors and swap.vae.pt (LDM files), swap-diffusers/ (the same VAE as a diffusers folder),
    sdxl-like/ (another scaling factor), notes.txt (not listed)."""
    root = tmp_path_factory.mktemp("VAE")
    files = write_vae_files(tiny_swap_vae(5, tiny_sd[0].vae.config.scaling_factor), root)
    tiny_swap_vae(7, 0.13025).save_pretrained(root / "sdxl-like")
    (root / "notes.txt").write_text("not a VAE")
    return root, files


@pytest.fixture(scope="module")
def vae_server(tiny_sd, vae_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("vae-cache")
    old = os.environ.get("SDRT_CACHE")
    os.environ["SDRT_CACHE"] = str(cache)  # the VAE exports go here, not into the user's cache
    try:
        with running_server(tiny_sd[1], tmp_path_factory.mktemp("vae-server"), "--vae-dir", str(vae_dir[0])) as server:
            yield server
    finally:
        os.environ.pop("SDRT_CACHE") if old is None else os.environ.__setitem__("SDRT_CACHE", old)


def generate(server, seed=7, **fields) -> dict:
    res = server.post("/sdapi/v1/txt2img", {"prompt": "a cat", **SMALL, "seed": seed, **fields})
    assert res.status_code == 200, res.text
    return res.json()


def pixels(body) -> np.ndarray:
    return np.asarray(decode_b64(body["images"][0]).convert("RGB"), dtype=np.int16)


def reference(tiny_sd, vae_source=None, seed=7) -> np.ndarray:
    """The Python API's image (A1111's GPU noise), with VAE_SOURCE exported as the CLI does (the same cache)."""
    from sdrt import Pipeline
    from sdrt.export.vae_files import export_vae

    vae_file = None if vae_source is None else str(export_vae(str(vae_source), tiny_sd[1], progress=False))
    image = Pipeline.load(tiny_sd[1]).generate("a cat", **SMALL, seed=seed, rng="gpu", progress=False,
                                               vae_file=vae_file)[0]  # fmt: skip
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_sd_vae_lists_the_folder_as_a1111(vae_server):
    names = [item["model_name"] for item in vae_server.get("/sdapi/v1/sd-vae").json()]
    assert names == ["sdxl-like", "swap-diffusers", "swap.safetensors", "swap.vae.pt"]
    assert all(item["filename"] == item["model_name"] for item in vae_server.get("/sdapi/v1/sd-vae").json())
    assert vae_server.get("/sdapi/v1/cmd-flags").json()["vae_dir"].startswith("VAE")


def test_override_settings_sd_vae_switches_the_vae(vae_server, tiny_sd, vae_dir):
    """Per request: the image is the Python API's with that VAE (and not the model's own: the twin); the infotext
    and info carry A1111's VAE hash and name; the export showed progress in the server's log."""
    body = generate(vae_server, override_settings={"sd_vae": "swap.safetensors"})
    want = reference(tiny_sd, vae_dir[1]["safetensors"])
    assert np.array_equal(pixels(body), want)
    own = generate(vae_server)  # override_settings_restore_afterwards: the model's own VAE again
    assert np.array_equal(pixels(own), reference(tiny_sd)) and np.abs(pixels(own) - want).max() > 20
    info = json.loads(body["info"])
    assert info["sd_vae_name"] == "swap.safetensors" and len(info["sd_vae_hash"]) == 10
    assert f"VAE hash: {info['sd_vae_hash']}, VAE: swap.safetensors" in info["infotexts"][0]
    assert json.loads(own["info"])["sd_vae_name"] is None
    assert "exporting the VAE" in vae_server.log() and "VAE: 100%" in vae_server.log()


def test_options_sd_vae_applies_to_the_next_images(vae_server, tiny_sd, vae_dir):
    assert vae_server.post("/sdapi/v1/options", {"sd_vae": "swap-diffusers"}).status_code == 200
    try:
        assert vae_server.get("/sdapi/v1/options").json()["sd_vae"] == "swap-diffusers"
        body = generate(vae_server, seed=8)
        assert np.array_equal(pixels(body), reference(tiny_sd, vae_dir[1]["diffusers"], seed=8))
        assert json.loads(body["info"])["sd_vae_name"] == "swap-diffusers"
    finally:
        assert vae_server.post("/sdapi/v1/options", {"sd_vae": "Automatic"}).status_code == 200
    assert json.loads(generate(vae_server, seed=8)["info"])["sd_vae_name"] is None


def test_unknown_or_unfitting_vae_is_a_422(vae_server, vae_dir):
    res = vae_server.post("/sdapi/v1/options", {"sd_vae": "nope.pt"})
    assert res.status_code == 422 and "options.sd_vae" in res.text
    assert "'Automatic', 'None', 'sdxl-like', 'swap-diffusers', 'swap.safetensors'" in res.text
    res = vae_server.post("/sdapi/v1/txt2img", {"prompt": "x", **SMALL, "override_settings": {"sd_vae": 3}})
    assert res.status_code == 422 and "override_settings.sd_vae" in res.text
    res = vae_server.post("/sdapi/v1/txt2img", {"prompt": "x", **SMALL, "override_settings": {"sd_vae": "sdxl-like"}})
    assert res.status_code == 422 and "scaling factor" in res.text and "override_settings.sd_vae" in res.text
    (vae_dir[0] / "late.safetensors").write_bytes((vae_dir[0] / "swap.safetensors").read_bytes())
    try:
        assert vae_server.post("/sdapi/v1/options", {"sd_vae": "late.safetensors"}).status_code == 422
        assert vae_server.post("/sdapi/v1/refresh-vae").status_code == 200
        assert "late.safetensors" in [v["model_name"] for v in vae_server.get("/sdapi/v1/sd-vae").json()]
    finally:
        (vae_dir[0] / "late.safetensors").unlink()
        vae_server.post("/sdapi/v1/refresh-vae")


def test_sd_vae_without_a_vae_dir(sdrt_server):
    """The server without --vae-dir lists no VAE and accepts only the model's own."""
    assert sdrt_server.get("/sdapi/v1/sd-vae").json() == []
    assert sdrt_server.post("/sdapi/v1/options", {"sd_vae": "None"}).status_code == 200
    res = sdrt_server.post("/sdapi/v1/options", {"sd_vae": "vae-ft-mse-840000-ema-pruned.safetensors"})
    assert res.status_code == 422 and "no --vae-dir" in res.text
