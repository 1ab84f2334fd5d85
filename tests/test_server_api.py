"""`sdrt serve` against a real server process on loopback (tiny model): every endpoint, A1111 defaults, errors."""

import json
import threading
import time

import numpy as np
import pytest
import requests
from server_fixture import SMALL, decode_b64, gradient, png_b64, running_server

from sdrt.cli import main

pytest.importorskip("fastapi")


def txt2img(server, **fields):
    res = server.post("/sdapi/v1/txt2img", {"prompt": "a cat", **SMALL, **fields})
    assert res.status_code == 200, res.text
    return res.json()


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_txt2img_response_is_a1111s(sdrt_server):
    """images (base64 PNG with infotext), parameters (the request with A1111's defaults), info (a JSON string)."""
    body = txt2img(sdrt_server, seed=5, batch_size=2, n_iter=2)
    info = json.loads(body["info"])
    assert len(body["images"]) == 4
    assert info["all_seeds"] == [5, 6, 7, 8]  # A1111: image i uses seed + i
    assert info["seed"] == 5 and len(info["all_subseeds"]) == 4
    assert info["sampler_name"] == "Euler" and info["steps"] == 4 and info["cfg_scale"] == 7.0
    assert info["width"] == info["height"] == 64 and info["batch_size"] == 2
    assert info["extra_generation_params"] == {"Schedule type": "Automatic"}
    for b64, text, seed in zip(body["images"], info["infotexts"], info["all_seeds"], strict=True):
        image = decode_b64(b64)
        assert image.format == "PNG" and image.size == (64, 64)
        assert image.info["parameters"] == text and f"Seed: {seed}," in text
    params = body["parameters"]
    assert params["sampler_index"] == "Euler" and params["sampler_name"] is None and params["scheduler"] is None
    assert params["cfg_scale"] == 7.0 and params["seed"] == 5 and params["send_images"] is True
    assert params["subseed"] == -1 and params["seed_resize_from_w"] == -1 and params["enable_hr"] is False


def test_a1111_defaults_in_the_openapi_schema(sdrt_server):
    """The request models' defaults are A1111's (modules/api/models.py over processing.py)."""
    schemas = sdrt_server.get("/openapi.json").json()["components"]["schemas"]
    t2i = schemas["Txt2ImgRequest"]["properties"]
    expected = {"steps": 50, "width": 512, "height": 512, "cfg_scale": 7.0, "seed": -1, "subseed": -1,
                "batch_size": 1, "n_iter": 1, "sampler_index": "Euler", "prompt": ""}  # fmt: skip
    assert {k: t2i[k].get("default") for k in expected} == expected
    i2i = schemas["Img2ImgRequest"]["properties"]
    expected = {"denoising_strength": 0.75, "resize_mode": 0, "mask_blur_x": 4, "mask_blur_y": 4,
                "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0,
                "inpainting_mask_invert": 0}  # fmt: skip
    assert {k: i2i[k].get("default") for k in expected} == expected
    assert sdrt_server.get("/docs").status_code == 200


def test_images_match_the_python_api(sdrt_server, tiny_pipeline):
    """An HTTP image is Pipeline.generate's for the same options (A1111's default RNG is "GPU"), bit for bit;
    image i of a batch equals a single image with seed + i; the wrong RNG would differ."""
    body = txt2img(sdrt_server, seed=11, batch_size=2, cfg_scale=5, sampler_name="Euler a")
    direct = tiny_pipeline.generate(
        "a cat", **SMALL, seed=11, batch_size=2, cfg_scale=5, sampler="Euler a", rng="gpu", progress=False
    )
    for b64, image in zip(body["images"], direct, strict=True):
        assert np.array_equal(pixels(decode_b64(b64)), pixels(image))
    single = txt2img(sdrt_server, seed=12, cfg_scale=5, sampler_name="Euler a")
    assert np.array_equal(pixels(decode_b64(single["images"][0])), pixels(decode_b64(body["images"][1])))
    cpu = tiny_pipeline.generate("a cat", **SMALL, seed=11, cfg_scale=5, sampler="Euler a", rng="torch", progress=False)
    assert np.abs(pixels(cpu[0]) - pixels(decode_b64(body["images"][0]))).max() > 10


def test_legacy_sampler_names_and_aliases(sdrt_server):
    legacy = txt2img(sdrt_server, seed=3, sampler_name="DPM++ 2M Karras")
    modern = txt2img(sdrt_server, seed=3, sampler_name="DPM++ 2M", scheduler="karras")
    info = json.loads(legacy["info"])
    assert info["sampler_name"] == "DPM++ 2M" and "Schedule type: Karras" in info["infotexts"][0]
    assert legacy["images"] == modern["images"]
    alias = txt2img(sdrt_server, seed=3, sampler_index="k_euler_a")  # sampler_name unset: sampler_index is used
    assert json.loads(alias["info"])["sampler_name"] == "Euler a"
    res = sdrt_server.post("/sdapi/v1/txt2img", {**SMALL, "sampler_name": "Nope"})
    assert res.status_code == 422 and res.json()["detail"][0]["loc"] == ["body", "sampler_name"]


def test_listing_endpoints(sdrt_server):
    samplers = sdrt_server.get("/sdapi/v1/samplers").json()
    names = [s["name"] for s in samplers]
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM"} <= set(names)
    assert "k_euler_a" in samplers[names.index("Euler a")]["aliases"]
    schedulers = {s["name"]: s for s in sdrt_server.get("/sdapi/v1/schedulers").json()}
    assert schedulers["karras"]["label"] == "Karras" and schedulers["karras"]["default_rho"] == 7.0
    models = sdrt_server.get("/sdapi/v1/sd-models").json()
    assert len(models) == 1 and models[0]["title"] == f"{models[0]['model_name']} [{models[0]['hash']}]"
    assert "/" not in models[0]["filename"]  # no server paths
    assert sdrt_server.get("/").headers["content-type"].startswith("text/html")
    assert sdrt_server.get("/static/app.js").status_code == 200


def test_options_and_override_settings(sdrt_server):
    options = sdrt_server.get("/sdapi/v1/options").json()
    assert options["randn_source"] == "GPU" and options["CLIP_stop_at_last_layers"] == 1
    try:
        assert sdrt_server.post("/sdapi/v1/options", {"randn_source": "CPU"}).status_code == 200
        assert "RNG: CPU" in json.loads(txt2img(sdrt_server, seed=1)["info"])["infotexts"][0]
    finally:
        sdrt_server.post("/sdapi/v1/options", {"randn_source": "GPU"})
    assert "RNG:" not in json.loads(txt2img(sdrt_server, seed=1)["info"])["infotexts"][0]  # A1111 omits GPU
    ensd = txt2img(sdrt_server, seed=1, sampler_name="Euler a", override_settings={"eta_noise_seed_delta": 31337})
    assert "ENSD: 31337" in json.loads(ensd["info"])["infotexts"][0]
    assert sdrt_server.get("/sdapi/v1/options").json()["eta_noise_seed_delta"] == 0  # per request only
    for body, loc in (
        ({"outdir_samples": "/tmp"}, ["body", "options", "outdir_samples"]),
        ({"sd_model_checkpoint": "other.safetensors"}, ["body", "options", "sd_model_checkpoint"]),
        ({"randn_source": "XPU"}, ["body", "options", "randn_source"]),
    ):
        res = sdrt_server.post("/sdapi/v1/options", body)
        assert res.status_code == 422 and res.json()["detail"][0]["loc"] == loc, res.text
    clip2 = txt2img(sdrt_server, seed=1, override_settings={"CLIP_stop_at_last_layers": 2})
    assert json.loads(clip2["info"])["clip_skip"] == 2 and "Clip skip: 2" in json.loads(clip2["info"])["infotexts"][0]
    assert clip2["images"] != txt2img(sdrt_server, seed=1)["images"]
    res = sdrt_server.post("/sdapi/v1/txt2img", {**SMALL, "override_settings": {"randn_source": "TPU"}})
    assert res.status_code == 422 and res.json()["detail"][0]["loc"] == ["body", "override_settings", "randn_source"]
    res = sdrt_server.post("/sdapi/v1/txt2img", {**SMALL, "override_settings": {"CLIP_stop_at_last_layers": 99}})
    assert res.status_code == 422 and "CLIP_stop_at_last_layers" in res.text


def test_img2img_and_inpainting(sdrt_server):
    init = gradient()
    body = sdrt_server.post(
        "/sdapi/v1/img2img", {"prompt": "a cat", **SMALL, "init_images": [png_b64(init)], "denoising_strength": 0.5}
    ).json()
    info = json.loads(body["info"])
    assert decode_b64(body["images"][0]).size == (64, 64) and info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in info["infotexts"][0]
    assert body["parameters"]["init_images"] is None  # A1111 leaves them out unless include_init_images
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :24] = 255  # repaint the left part
    from PIL import Image

    request = {"prompt": "a cat", **SMALL, "init_images": [png_b64(init)], "mask": png_b64(Image.fromarray(mask)),
               "inpaint_full_res": False, "inpainting_fill": 1, "seed": 4}  # fmt: skip
    out = pixels(decode_b64(sdrt_server.post("/sdapi/v1/img2img", request).json()["images"][0]))
    # the blurred mask (sigma 4: 11 px reach, doubled for the overlay) never reaches x >= 40: the original there
    assert np.array_equal(out[:, 40:], pixels(init)[:, 40:])
    assert np.abs(out[:, :16] - pixels(init)[:, :16]).max() > 10
    inverted = sdrt_server.post("/sdapi/v1/img2img", {**request, "inpainting_mask_invert": 1}).json()
    assert np.array_equal(pixels(decode_b64(inverted["images"][0]))[:, :8], pixels(init)[:, :8])
    only_masked = sdrt_server.post("/sdapi/v1/img2img", {**request, "inpaint_full_res": True}).json()  # A1111's default
    assert decode_b64(only_masked["images"][0]).size == (64, 64)
    assert json.loads(only_masked["info"])["is_using_inpainting_conditioning"] is False


def test_outpaint_endpoint(sdrt_server):
    image = gradient()
    res = sdrt_server.post("/sdrt/v1/outpaint", {"prompt": "a cat", "steps": 4, "image": png_b64(image), "right": 32})
    assert res.status_code == 200, res.text
    out = pixels(decode_b64(res.json()["images"][0]))
    assert out.shape == (64, 96, 3)
    assert np.array_equal(out[:, :32], pixels(image)[:, :32])  # far from the seam: the original
    res = sdrt_server.post("/sdrt/v1/outpaint", {"image": png_b64(image), "right": 12})
    assert res.status_code == 422 and res.json()["detail"][0]["loc"] == ["body", "right"]
    res = sdrt_server.post("/sdrt/v1/outpaint", {"image": png_b64(gradient(60, 64)), "right": 8})
    assert res.status_code == 422 and res.json()["detail"][0]["loc"] == ["body", "image"]


@pytest.mark.parametrize(
    "fields, loc",
    [
        ({"width": 65}, "width"),
        ({"steps": 0}, "steps"),
        ({"steps": 201}, "steps"),  # the server's --max-steps
        ({"steps": "many"}, "steps"),  # pydantic's own 422
        ({"batch_size": 9}, "batch_size"),
        ({"n_iter": 65}, "n_iter"),
        ({"cfg_scale": -1}, "cfg_scale"),
        ({"seed": -2}, "seed"),
        ({"width": 2048, "height": 4096}, "width"),
        ({"enable_hr": True, "hr_upscaler": "nope"}, "hr_upscaler"),
        ({"restore_faces": True}, "restore_faces"),
        ({"script_name": "x/y/z plot"}, "script_name"),
        ({"scheduler": "nope"}, "scheduler"),
    ],
)
def test_validation_errors_name_the_field(sdrt_server, fields, loc):
    res = sdrt_server.post("/sdapi/v1/txt2img", {**SMALL, **fields})
    assert res.status_code == 422, res.text
    assert res.json()["detail"][0]["loc"][:2] == ["body", loc]


def test_image_errors(sdrt_server):
    def img2img(**fields):
        return sdrt_server.post("/sdapi/v1/img2img", {**SMALL, **fields})

    for bad in ("not base64!", "aGVsbG8=", "/etc/passwd", "http://example.com/a.png", ""):
        res = img2img(init_images=[bad])
        assert res.status_code == 400 and "init_images[0]" in res.json()["detail"], (bad, res.text)
    truncated = png_b64(gradient())[:200]
    assert img2img(init_images=[truncated]).status_code == 400
    assert img2img(init_images=[png_b64(gradient())], mask="nope").status_code == 400
    for fields, loc in (
        ({}, "init_images"),
        ({"init_images": [png_b64(gradient())] * 2}, "init_images"),
        ({"init_images": [png_b64(gradient())], "resize_mode": 3}, "resize_mode"),
        ({"init_images": [png_b64(gradient())], "denoising_strength": 1.5}, "denoising_strength"),
        ({"init_images": [png_b64(gradient())], "mask": png_b64(gradient()), "inpainting_mask_invert": 2},
         "inpainting_mask_invert"),
        ({"init_images": [png_b64(gradient())], "mask": png_b64(gradient()), "inpainting_fill": 7}, "inpainting_fill"),
    ):  # fmt: skip
        res = img2img(**fields)
        assert res.status_code == 422 and res.json()["detail"][0]["loc"][:2] == ["body", loc], res.text
    big = sdrt_server.post("/sdapi/v1/img2img", data=b"x" * (3 * 2**20), headers={"Content-Type": "application/json"})
    assert big.status_code == 413
    headers = {"Content-Type": "application/json"}
    assert sdrt_server.post("/sdapi/v1/txt2img", data=b"{not json", headers=headers).status_code == 422


def test_png_info(sdrt_server):
    body = txt2img(sdrt_server, seed=77, negative_prompt="blurry")
    res = sdrt_server.post("/sdapi/v1/png-info", {"image": body["images"][0]}).json()
    assert res["info"] == json.loads(body["info"])["infotexts"][0]
    params = res["parameters"]
    assert params["Prompt"] == "a cat" and params["Negative prompt"] == "blurry"
    assert params["Seed"] == "77" and params["Size-1"] == "64" and params["Steps"] == "4"
    plain = sdrt_server.post("/sdapi/v1/png-info", {"image": png_b64(gradient())}).json()
    assert plain["info"] == "" and plain["parameters"] == {}
    assert sdrt_server.post("/sdapi/v1/png-info", {"image": "xx"}).status_code == 400


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_progress_preview_and_interrupt(sdrt_server):
    """A1111's progress fields while a job runs, a live preview every 10 steps, and Interrupt: the batches already
    finished come back (the interrupted one is dropped), and the server serves the next request."""
    idle = sdrt_server.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job"] == "" and idle["current_image"] is None
    result = {}
    request = {"prompt": "a cat", "width": 64, "height": 64, "steps": 60, "n_iter": 4, "seed": 1}
    thread = threading.Thread(target=lambda: result.update(res=sdrt_server.post("/sdapi/v1/txt2img", request)))
    thread.start()
    running = wait_for(lambda: (p := sdrt_server.get("/sdapi/v1/progress").json())["state"]["job_no"] >= 1 and p)
    assert running["state"]["job"] == "txt2img" and running["state"]["job_count"] == 4
    assert running["state"]["sampling_steps"] == 60 and 0 < running["progress"] < 1 and running["eta_relative"] > 0
    # A1111's default live preview method, Approx NN, is served as Approx cheap on a folder without TAESD: an image
    # of the latent's size (runtime/previews.py)
    assert decode_b64(running["current_image"]).size == (8, 8)
    assert sdrt_server.get("/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None
    assert sdrt_server.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(30)
    body = result["res"].json()
    assert 1 <= len(body["images"]) < 4 and len(json.loads(body["info"])["all_seeds"]) == 4
    assert sdrt_server.get("/sdapi/v1/progress").json()["state"]["job"] == ""
    assert len(txt2img(sdrt_server)["images"]) == 1  # the next job is not interrupted


def test_progress_and_interrupt_by_task_id(sdrt_server):
    """?id_task= (a request's force_task_id, as `sdrt serve --ray` routes them): progress of another id is idle,
    interrupt of another id leaves the job running, interrupt of its id stops it."""
    result = {}
    # 256 px, 200 steps: seconds of work on the tiny model even on an idle machine (64 px: 0.3 s, a race)
    request = {"prompt": "a cat", "width": 256, "height": 256, "steps": 200, "seed": 1, "force_task_id": "task(t1)"}
    thread = threading.Thread(target=lambda: result.update(res=sdrt_server.post("/sdapi/v1/txt2img", request)))
    thread.start()
    wait_for(lambda: sdrt_server.get("/sdapi/v1/progress?id_task=task(t1)").json()["state"]["sampling_step"] > 0)
    assert sdrt_server.get("/sdapi/v1/progress?id_task=task(t2)").json()["state"]["job"] == ""
    assert sdrt_server.post("/sdapi/v1/interrupt?id_task=task(t2)").status_code == 200
    time.sleep(0.3)
    assert thread.is_alive()
    assert sdrt_server.post("/sdapi/v1/interrupt?id_task=task(t1)").status_code == 200
    thread.join(30)
    assert result["res"].status_code == 200 and result["res"].json()["images"] == []


def test_client_disconnect_mid_job(sdrt_server):
    request = {"prompt": "a cat", "width": 256, "height": 256, "steps": 100}  # seconds of work: outlives 0.3 s
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(sdrt_server.url + "/sdapi/v1/txt2img", json=request, timeout=0.3)
    assert len(txt2img(sdrt_server, seed=2)["images"]) == 1
    assert sdrt_server.process.poll() is None


def test_client_leaving_the_queue_frees_its_place(sdrt_server):
    """A request whose client leaves while it waits is never run: no 150-step job shows in the progress."""
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.add(sdrt_server.get("/sdapi/v1/progress").json()["state"]["sampling_steps"])
            time.sleep(0.02)

    # the busy job runs until interrupted (8 batches of 100 steps), so the test does not race the machine's speed
    busy = threading.Thread(
        target=lambda: sdrt_server.post("/sdapi/v1/txt2img", {**SMALL, "width": 256, "height": 256, "steps": 100,
                                                              "n_iter": 8})  # fmt: skip
    )
    busy.start()
    wait_for(lambda: sdrt_server.get("/sdapi/v1/progress").json()["state"]["sampling_steps"] == 100)
    watcher = threading.Thread(target=watch)
    watcher.start()
    with pytest.raises(requests.exceptions.ReadTimeout):  # queued behind the 100-step job, then gone
        requests.post(sdrt_server.url + "/sdapi/v1/txt2img", json={**SMALL, "steps": 150}, timeout=0.3)
    time.sleep(1.0)  # four of the server's disconnect polls
    assert sdrt_server.post("/sdapi/v1/interrupt").status_code == 200
    busy.join(30)
    assert len(txt2img(sdrt_server, seed=3)["images"]) == 1  # queued after the abandoned one
    done.set()
    watcher.join(5)
    assert 150 not in seen and 100 in seen


def test_basic_auth(tiny_sd, tmp_path):
    with running_server(tiny_sd[1], tmp_path, "--api-auth", "alice:s3cret,bob:pw") as server:
        url = server.url
        for path in ("/", "/docs", "/sdapi/v1/options"):
            res = requests.get(url + path, timeout=10)
            assert res.status_code == 401 and res.headers["WWW-Authenticate"].startswith("Basic")
        assert requests.get(url + "/sdapi/v1/options", auth=("alice", "wrong"), timeout=10).status_code == 401
        assert requests.get(url + "/sdapi/v1/options", auth=("alice", "s3cret"), timeout=10).status_code == 200
        res = requests.post(url + "/sdapi/v1/txt2img", json={**SMALL}, auth=("bob", "pw"), timeout=60)
        assert res.status_code == 200 and len(res.json()["images"]) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--api-auth", "no-colon"], "--api-auth"),
        (["--port", "70000"], "--port"),
        (["--max-queue", "0"], "--max-queue"),
    ],
)
def test_serve_bad_arguments_exit_2(tiny_sd, capsys, args, message):
    assert main(["serve", "-m", str(tiny_sd[1]), *args]) == 2
    assert message in capsys.readouterr().err


def test_serve_missing_model_exits_2(tmp_path, capsys):
    assert main(["serve", "-m", str(tmp_path / "nothing")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_infotext_fills_the_fields_not_given(sdrt_server):
    """A1111's `infotext` request field: its parameters apply where the request is silent; given fields win."""
    infotext = ("a dog\nNegative prompt: ugly\nSteps: 5, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4.5, "
                "Seed: 99, Size: 64x64, RNG: CPU")  # fmt: skip
    body = sdrt_server.post("/sdapi/v1/txt2img", {"infotext": infotext, "steps": 3}).json()
    info = json.loads(body["info"])
    assert info["prompt"] == "a dog" and info["negative_prompt"] == "ugly" and info["all_seeds"] == [99]
    assert info["steps"] == 3 and info["cfg_scale"] == 4.5 and info["sampler_name"] == "DPM++ 2M"
    assert "Schedule type: Karras" in info["infotexts"][0] and "RNG: CPU" in info["infotexts"][0]
    assert body["parameters"]["override_settings"] == {"randn_source": "CPU"}


def test_pipeline_callback_and_interrupt(tiny_pipeline):
    """Pipeline.generate's callback: once per sampler step over the whole run, with the (batch, C, h, w) x0
    estimate; raising Interrupted keeps the finished batches, identical to an uninterrupted run's."""
    from sdrt.runtime.errors import Interrupted

    calls = []

    def record(step, total, denoised):
        calls.append((step, total, denoised.shape))

    full = tiny_pipeline.generate(
        "a cat", **SMALL, seed=8, batch_size=2, batch_count=3, callback=record, progress=False
    )
    assert calls == [(i, 12, (2, 4, 8, 8)) for i in range(1, 13)]

    def stop_in_second_batch(step, total, denoised):
        if step == 6:
            raise Interrupted()

    part = tiny_pipeline.generate(
        "a cat", **SMALL, seed=8, batch_size=2, batch_count=3, callback=stop_in_second_batch, progress=False
    )
    assert len(part) == 2
    for a, b in zip(part, full[:2], strict=True):
        assert np.array_equal(pixels(a), pixels(b)) and a.info["parameters"] == b.info["parameters"]


def test_server_imports_no_torch():
    """The server is runtime code: importing it pulls in no torch, diffusers, transformers or sdrt.export."""
    import subprocess
    import sys

    code = (
        "import sys, sdrt.server.app; "
        "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers') "
        "or m.startswith('sdrt.export')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
