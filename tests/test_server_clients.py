"""Real A1111 clients against `sdrt serve --models-dir`: webuiapi's helpers, and the request sequences SillyTavern
and Open WebUI send (connect, list, pick a model, generate), written from their sources:

- SillyTavern, src/endpoints/stable-diffusion.js (its server side of the "SD WebUI" source) and the extension's
  generateAutoImage: ping = GET options; upscalers + latent-upscale-modes; sd-vae (and Forge's sd-modules, either
  may fail); samplers; schedulers; sd-models (titles); get-model = GET options; set-model = POST options
  {sd_model_checkpoint} then GET progress until idle; generate = GET options (a Forge check) then POST txt2img with
  the extension's body.
- Open WebUI, backend/open_webui/routers/images.py (engine "automatic1111"): verify = GET options; models = GET
  sd-models (title as id, model_name as name); set model = GET options, change sd_model_checkpoint, POST the whole
  dict back; generate = POST txt2img {prompt, batch_size, width, height, steps, negative_prompt}, reading images
  and info.
"""

import json

import numpy as np
import pytest
from server_fixture import SMALL, decode_b64, running_server

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def clients_server(tiny_sd, tiny_sd_v, tmp_path_factory):
    root = tmp_path_factory.mktemp("client-models")
    (root / "models").mkdir()
    (root / "models" / "alpha").symlink_to(tiny_sd[1], target_is_directory=True)
    (root / "models" / "beta").symlink_to(tiny_sd_v[1], target_is_directory=True)
    (root / "styles.csv").write_text("name,prompt,negative_prompt\nsketch,\"{prompt}, pencil sketch\",color\n")
    args = ("--models-dir", str(root / "models"), "-m", "alpha", "--styles-file", str(root / "styles.csv"))
    with running_server(None, tmp_path_factory.mktemp("clients-server"), *args) as server:
        yield server


def titles(server) -> dict:
    return {m["model_name"]: m["title"] for m in server.get("/sdapi/v1/sd-models").json()}


def test_webuiapi_helpers(clients_server):
    """webuiapi 0.9.17's helpers, as a script written for A1111 calls them."""
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(baseurl=clients_server.url + "/sdapi/v1", sampler="Euler a", steps=4)
    models = titles(clients_server)
    assert sorted(m["title"] for m in api.get_sd_models()) == sorted(models.values())
    api.util_set_model("Beta")  # find_closest: lower-cased, nearest title
    assert api.util_get_current_model() == models["beta"]
    api.util_set_model(models["alpha"], find_closest=False)
    assert api.util_get_current_model() == models["alpha"]
    assert api.refresh_checkpoints() is None
    assert set(api.get_embeddings()) == {"loaded", "skipped"}
    assert api.get_memory()["ram"]["used"] > 0
    assert api.skip() is None  # nothing running: nothing to skip
    assert api.get_prompt_styles()[0]["name"] == "sketch"
    assert api.get_sd_vae() == [] and api.get_face_restorers() == []
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]  # no --upscaler-dir
    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    result = api.txt2img(prompt="a cat", width=64, height=64, seed=3, styles=["sketch"])  # webuiapi's full body
    assert result.image.size == (64, 64) and result.info["prompt"] == "a cat, pencil sketch"
    api.util_wait_for_ready(check_interval=0.1)


def sillytavern_body(prompt: str) -> dict:
    """SillyTavern's generateAutoImage body (the extension's defaults: no VAE listed, clip skip 1, no hires fix)."""
    return {
        "prompt": prompt, "negative_prompt": "lowres, bad anatomy", "sampler_name": "DPM++ 2M", "scheduler": "karras",
        "steps": SMALL["steps"], "cfg_scale": 7, "width": 64, "height": 64, "restore_faces": False, "enable_hr": False,
        "hr_upscaler": "Latent", "hr_scale": 1.0, "hr_additional_modules": [], "denoising_strength": 0.7,
        "hr_second_pass_steps": 0, "seed": 11, "override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": ""},
        "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True, "send_images": True,
        "do_not_save_grid": False, "do_not_save_samples": False,
    }  # fmt: skip


def test_sillytavern_sequence(clients_server):
    s = clients_server
    assert s.get("/sdapi/v1/options").status_code == 200  # ping
    upscalers = [x["name"] for x in s.get("/sdapi/v1/upscalers").json()]
    latent = [x["name"] for x in s.get("/sdapi/v1/latent-upscale-modes").json()]
    assert upscalers == ["None", "Lanczos", "Nearest"] and latent[0] == "Latent" and len(latent) == 6
    assert isinstance(s.get("/sdapi/v1/sd-vae").json(), list)  # sd-modules (Forge's) may 404: allSettled
    samplers = [x["name"] for x in s.get("/sdapi/v1/samplers").json()]
    schedulers = [x["name"] for x in s.get("/sdapi/v1/schedulers").json()]
    assert "DPM++ 2M" in samplers and "karras" in schedulers
    models = [{"value": x["title"], "text": x["title"]} for x in s.get("/sdapi/v1/sd-models").json()]
    current = s.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    assert current in [m["value"] for m in models]
    beta = titles(s)["beta"]
    assert s.post("/sdapi/v1/options", {"sd_model_checkpoint": beta}).status_code == 200  # set-model
    progress = s.get("/sdapi/v1/progress").json()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0  # loaded: idle at once
    options = s.get("/sdapi/v1/options").json()
    assert "forge_preset" not in options  # not Forge: SillyTavern drops forge_additional_modules
    res = s.post("/sdapi/v1/txt2img", sillytavern_body("a knight"))
    assert res.status_code == 200, res.text
    image = decode_b64(res.json()["images"][0])
    assert image.size == (64, 64) and json.loads(res.json()["info"])["sd_model_hash"] == beta.split("[")[1][:-1]
    s.post("/sdapi/v1/options", {"sd_model_checkpoint": "alpha"})


def test_open_webui_sequence(clients_server):
    s = clients_server
    assert s.get("/sdapi/v1/options").status_code == 200  # verify the URL
    listed = [{"id": m["title"], "name": m["model_name"]} for m in s.get("/sdapi/v1/sd-models").json()]
    assert {m["name"] for m in listed} == {"alpha", "beta"}
    chosen = next(m["id"] for m in listed if m["name"] == "beta")
    options = s.get("/sdapi/v1/options").json()
    if chosen != options["sd_model_checkpoint"]:  # set_image_model: the whole dict goes back
        options["sd_model_checkpoint"] = chosen
        res = s.post("/sdapi/v1/options", options)
        assert res.status_code == 200, res.text
    assert s.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == chosen
    data = {"prompt": "a lighthouse", "batch_size": 2, "width": 64, "height": 64, "steps": 4, "negative_prompt": "fog"}
    res = s.post("/sdapi/v1/txt2img", data)
    assert res.status_code == 200, res.text
    body = res.json()
    info = json.loads(body["info"])
    assert len(body["images"]) == 2 and info["negative_prompt"] == "fog"
    a, b = (np.asarray(decode_b64(x).convert("RGB"), dtype=np.int16) for x in body["images"])
    assert np.abs(a - b).max() > 0  # two seeds, two images
    s.post("/sdapi/v1/options", {"sd_model_checkpoint": "alpha"})
