"""`sdrt serve --models-dir`: A1111's model list, switching (options, override_settings), the LRU of loaded models,
export on first use, refresh/unload/reload, and the errors (unknown title, a file that is not a model)."""

import json
import os
import threading

import numpy as np
import pytest
from server_fixture import SMALL, decode_b64, running_server

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def models_dir(tiny_sd, tiny_sd_v, tmp_path_factory):
    """alpha (tiny SD, exported), beta (tiny SD 2-like v model, exported), gamma (tiny SD's diffusers folder: exported
    on first use), notes.txt (not a model) and broken.safetensors (not a checkpoint)."""
    root = tmp_path_factory.mktemp("models")
    (root / "alpha").symlink_to(tiny_sd[1], target_is_directory=True)
    (root / "beta").symlink_to(tiny_sd_v[1], target_is_directory=True)
    (root / "gamma").symlink_to(tiny_sd[1].parent / "diffusers", target_is_directory=True)
    (root / "notes.txt").write_text("not a model")
    (root / "broken.safetensors").write_bytes(b"\x00" * 64)
    return root


@pytest.fixture(scope="module")
def models_server(models_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("SDRT_CACHE")
    os.environ["SDRT_CACHE"] = str(cache)  # gamma's export goes here, not into the user's cache
    try:
        args = ("--models-dir", str(models_dir), "--max-loaded-models", "2", "-m", "alpha")
        with running_server(None, tmp_path_factory.mktemp("models-server"), *args) as server:
            yield server
    finally:
        os.environ.pop("SDRT_CACHE") if old is None else os.environ.__setitem__("SDRT_CACHE", old)


def listing(server) -> dict:
    return {m["filename"]: m for m in server.get("/sdapi/v1/sd-models").json()}


def generate(server, seed=7, **fields) -> dict:
    res = server.post("/sdapi/v1/txt2img", {"prompt": "a cat", **SMALL, "seed": seed, **fields})
    assert res.status_code == 200, res.text
    return res.json()


def pixels(b64_or_image) -> np.ndarray:
    image = decode_b64(b64_or_image) if isinstance(b64_or_image, str) else b64_or_image
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def reference(folder, seed=7):
    from sdrt import Pipeline

    return Pipeline.load(folder).generate("a cat", **SMALL, seed=seed, rng="gpu", progress=False)[0]


def select(server, title) -> None:
    res = server.post("/sdapi/v1/options", {"sd_model_checkpoint": title})
    assert res.status_code == 200, res.text


def test_sd_models_lists_the_folder_as_a1111(models_server, tiny_sd, tiny_sd_v):
    """title "name [shorthash]", model_name, hash (10 hex digits of sha256), sha256, filename; a non-model file and
    a broken checkpoint are listed without breaking the listing."""
    models = listing(models_server)
    assert set(models) == {"alpha", "beta", "gamma", "notes.txt", "broken.safetensors"}
    alpha = models["alpha"]
    assert len(alpha["sha256"]) == 64 and alpha["hash"] == alpha["sha256"][:10]
    assert alpha["title"] == f"alpha [{alpha['hash']}]" and alpha["model_name"] == "alpha"
    assert models["beta"]["sha256"] != alpha["sha256"]
    assert models["notes.txt"]["unusable"].startswith("not a model")
    assert models["broken.safetensors"]["model_name"] == "broken" and models["broken.safetensors"]["hash"] is None
    assert models["gamma"]["hash"] is None  # not exported yet: A1111 lists an unhashed checkpoint by name
    assert models_server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == alpha["title"]  # -m alpha


def test_switch_by_options_generates_with_that_model(models_server, tiny_sd, tiny_sd_v):
    """After POST options sd_model_checkpoint, images are the selected model's, bit for bit (and differ from the
    other model's, so the check can fail)."""
    models = listing(models_server)
    select(models_server, models["beta"]["title"])
    assert models_server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models["beta"]["title"]
    body = generate(models_server)
    assert np.array_equal(pixels(body["images"][0]), pixels(reference(tiny_sd_v[1])))
    assert np.abs(pixels(body["images"][0]) - pixels(reference(tiny_sd[1]))).max() > 10
    select(models_server, "alpha")  # a name (an A1111 alias) selects too
    body = generate(models_server)
    assert np.array_equal(pixels(body["images"][0]), pixels(reference(tiny_sd[1])))
    assert json.loads(body["info"])["sd_model_hash"] == models["alpha"]["hash"]


def test_override_settings_picks_the_model_per_request(models_server, tiny_sd_v):
    models = listing(models_server)
    select(models_server, "alpha")
    body = generate(models_server, override_settings={"sd_model_checkpoint": models["beta"]["title"]})
    assert np.array_equal(pixels(body["images"][0]), pixels(reference(tiny_sd_v[1])))
    assert models_server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models["alpha"]["title"]
    generate(models_server, override_settings={"sd_model_checkpoint": "beta"},
             override_settings_restore_afterwards=False)  # fmt: skip
    assert models_server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models["beta"]["title"]
    select(models_server, "alpha")


def test_unknown_or_unusable_model_is_a_422_listing_the_titles(models_server):
    models = listing(models_server)
    res = models_server.post("/sdapi/v1/options", {"sd_model_checkpoint": "nope [0123456789]"})
    assert res.status_code == 422
    detail = res.json()["detail"][0]
    assert detail["loc"] == ["body", "options", "sd_model_checkpoint"] and models["alpha"]["title"] in detail["msg"]
    res = models_server.post("/sdapi/v1/txt2img", {**SMALL, "override_settings": {"sd_model_checkpoint": "nope"}})
    assert res.status_code == 422 and res.json()["detail"][0]["loc"][-1] == "sd_model_checkpoint"
    res = models_server.post("/sdapi/v1/options", {"sd_model_checkpoint": "notes.txt"})
    assert res.status_code == 422 and "not a model" in res.text
    res = models_server.post("/sdapi/v1/options", {"sd_model_checkpoint": "broken.safetensors"})
    assert res.status_code == 422 and "export failed" in res.text
    assert "export failed" in listing(models_server)["broken.safetensors"]["unusable"]
    assert generate(models_server)["images"]  # the server goes on


def test_diffusers_folder_is_exported_on_first_use(models_server, tiny_sd):
    """gamma (a diffusers folder) is exported into the cache when selected; its title gains the hash, as A1111's
    does once hashed; it generates what the tiny SD export does."""
    select(models_server, "gamma")
    gamma = listing(models_server)["gamma"]
    assert gamma["hash"] and gamma["title"] == f"gamma [{gamma['hash']}]"
    assert models_server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == gamma["title"]
    body = generate(models_server)
    assert np.array_equal(pixels(body["images"][0]), pixels(reference(tiny_sd[1])))
    select(models_server, "alpha")


def test_lru_keeps_two_models_loaded(models_server):
    """--max-loaded-models 2: switching back and forth between two models loads each once."""
    models_server.post("/sdapi/v1/unload-checkpoint")
    before = models_server.log().count("sdrt serve: loading")
    for name in ("alpha", "beta", "alpha", "beta"):
        select(models_server, name)
    assert models_server.log().count("sdrt serve: loading") - before == 2


def test_lru_of_one_reloads_on_each_switch(models_dir, tmp_path):
    """The can-fail twin: with --max-loaded-models 1 the same switches load four times."""
    with running_server(None, tmp_path, "--models-dir", str(models_dir), "-m", "alpha") as server:
        generate(server)
        before = server.log().count("sdrt serve: loading")
        for name in ("beta", "alpha", "beta", "alpha"):
            select(server, name)
        assert server.log().count("sdrt serve: loading") - before == 4


def test_memory_budget_bounds_the_lru(models_dir, tiny_sd, tiny_sd_v, tmp_path):
    """--models-memory one byte short of both models' weights: with room for two by count, each switch still
    loads (the budget evicts), where --max-loaded-models 2 alone loads each once (test_lru_keeps_two_models_loaded)."""
    from sdrt.runtime.manifest import Manifest
    from sdrt.server.models import weights_bytes

    both = weights_bytes(Manifest.load(tiny_sd[1])) + weights_bytes(Manifest.load(tiny_sd_v[1]))
    budget = ("--max-loaded-models", "2", "--models-memory", str(both - 1))
    args = ("--models-dir", str(models_dir), "-m", "alpha", *budget)
    with running_server(None, tmp_path, *args) as server:
        generate(server)
        before = server.log().count("sdrt serve: loading")
        for name in ("beta", "alpha", "beta", "alpha"):
            select(server, name)
        assert server.log().count("sdrt serve: loading") - before == 4
    from sdrt.cli import main

    assert main(["serve", "--models-dir", str(models_dir), "--models-memory", "lots"]) == 2


def test_a_switch_waits_for_the_running_request(models_server, tiny_sd):
    """A switch posted while a request generates waits for it: that request's image is all the old model's."""
    select(models_server, "alpha")
    result = {}
    steps = 40
    worker = threading.Thread(target=lambda: result.update(body=generate(models_server, steps=steps)))
    worker.start()
    while models_server.get("/sdapi/v1/progress").json()["state"]["job"] != "txt2img" and worker.is_alive():
        pass
    select(models_server, "beta")
    worker.join()
    from sdrt import Pipeline

    expected = Pipeline.load(tiny_sd[1]).generate("a cat", **{**SMALL, "steps": steps}, seed=7, rng="gpu",
                                                  progress=False)[0]  # fmt: skip
    assert np.array_equal(pixels(result["body"]["images"][0]), pixels(expected))
    select(models_server, "alpha")


def test_refresh_unload_reload(models_server, models_dir, tiny_sd):
    assert "delta" not in listing(models_server)
    (models_dir / "delta").symlink_to(tiny_sd[1], target_is_directory=True)
    try:
        assert models_server.post("/sdapi/v1/refresh-checkpoints").status_code == 200
        assert "delta" in listing(models_server)
        select(models_server, "delta")
    finally:
        (models_dir / "delta").unlink()
    models_server.post("/sdapi/v1/refresh-checkpoints")
    assert "delta" not in listing(models_server)
    res = models_server.post("/sdapi/v1/txt2img", {**SMALL})  # the current model has gone: 422 listing the others
    assert res.status_code == 422 and "alpha" in res.text
    select(models_server, "alpha")
    assert models_server.post("/sdapi/v1/unload-checkpoint").status_code == 200
    before = models_server.log().count("sdrt serve: loading alpha")
    assert models_server.post("/sdapi/v1/reload-checkpoint").status_code == 200
    assert models_server.log().count("sdrt serve: loading alpha") == before + 1
    assert generate(models_server)["images"]


def test_models_dir_cli_errors(tmp_path):
    from sdrt.cli import main

    assert main(["serve", "--models-dir", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--models-dir", str(tmp_path), "--max-loaded-models", "0"]) == 2
    # over Ray too, checked before the cluster starts (the folder over Ray: tests/test_server_ray.py)
    assert main(["serve", "--models-dir", str(tmp_path), "--ray", "--max-loaded-models", "0"]) == 2
    assert main(["serve", "--models-dir", str(tmp_path), "--ray", "-m", "missing"]) == 2


def test_single_file_checkpoint_listed_then_exported_on_first_use(tiny_sd, tmp_path):
    """A single-file checkpoint (the tiny model in the original LDM layout) in the folder: listed as A1111 lists a
    checkpoint file (name with its suffix, model_name without, no hash before its export), exported on first use
    and only then (the exporter: sdrt's export with the tiny architecture's config, as an offline export needs),
    then hashed (sha256 of the file) and generating the diffusers folder export's images (1/255, as
    tests/test_single_file.py)."""
    import hashlib

    from fastapi.testclient import TestClient
    from ldm_layout import to_ldm_state_dict
    from safetensors.torch import save_file

    from sdrt.export import export
    from sdrt.server.app import create_app
    from sdrt.server.generation import LocalBackend
    from sdrt.server.models import ModelsFolder

    models = tmp_path / "models"
    models.mkdir()
    checkpoint = models / "tiny.safetensors"
    save_file(to_ldm_state_dict(tiny_sd[0]), str(checkpoint))
    exported = []

    def exporter(path):
        out = tmp_path / f"export-{len(exported)}"
        export(path, out, config=str(tiny_sd[1].parent / "diffusers"), progress=False)
        exported.append(path)
        return out

    backend = LocalBackend(loaded=ModelsFolder(models, exporter=exporter).loaded_models("cpu", None))
    client = TestClient(create_app(None, backend=backend))
    try:
        item = {"title": "tiny.safetensors", "model_name": "tiny", "hash": None, "sha256": None,
                "filename": "tiny.safetensors", "config": None}  # fmt: skip
        assert client.get("/sdapi/v1/sd-models").json() == [item] and not exported
        request = {"prompt": "a cat", **SMALL, "seed": 7, "override_settings": {"sd_model_checkpoint": "tiny"}}
        body = client.post("/sdapi/v1/txt2img", json=request)
        assert body.status_code == 200, body.text
        assert exported == [str(checkpoint)]
        sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        (listed,) = client.get("/sdapi/v1/sd-models").json()
        assert listed["sha256"] == sha and listed["title"] == f"tiny.safetensors [{sha[:10]}]"
        assert np.abs(pixels(body.json()["images"][0]) - pixels(reference(tiny_sd[1]))).max() <= 1
        assert client.post("/sdapi/v1/txt2img", json={**request, "seed": 8}).status_code == 200
        assert len(exported) == 1  # exported once
    finally:
        backend.stop()
