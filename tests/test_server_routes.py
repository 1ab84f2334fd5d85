"""The A1111 routes and settings clients call besides generation: the whole options dict, embeddings (+
--embeddings-dir), styles (+ --styles-file), skip, memory, scripts, extensions, face restorers, cmd-flags, sd-vae."""

import json
import threading
import time

import numpy as np
import pytest
from server_fixture import SMALL, decode_b64, running_server

pytest.importorskip("fastapi")
torch = pytest.importorskip("torch")

WIDTH = 32  # the tiny text encoder's
STYLES_CSV = (
    "name,prompt,negative_prompt\n"
    'cinematic,"{prompt}, cinematic lighting",blurry\n'
    "plain,oil painting,\n"
    ",no name here,\n"  # skipped: no name
    'extra,"a","b","c"\n'  # skipped: more fields than the header
)


def write_embedding(path, n: int, seed: int, width: int = WIDTH) -> None:
    """An A1111 .pt textual inversion of N random vectors."""
    tensor = torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5
    torch.save({"string_to_param": {"*": torch.nn.Parameter(tensor)}, "name": path.stem}, path)


@pytest.fixture(scope="module")
def extras_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("extras")
    (root / "embeddings").mkdir()
    write_embedding(root / "embeddings" / "mycat.pt", 3, seed=5)
    write_embedding(root / "embeddings" / "wide.pt", 2, seed=6, width=64)  # another model's: skipped
    (root / "styles.csv").write_text(STYLES_CSV)
    return root


@pytest.fixture(scope="module")
def server(tiny_sd, extras_dir, tmp_path_factory):
    args = ("--embeddings-dir", str(extras_dir / "embeddings"), "--styles-file", str(extras_dir / "styles.csv"))
    with running_server(tiny_sd[1], tmp_path_factory.mktemp("routes-server"), *args) as running:
        yield running


def generate(server, **fields) -> dict:
    res = server.post("/sdapi/v1/txt2img", {"prompt": "a cat", **SMALL, "seed": 3, **fields})
    assert res.status_code == 200, res.text
    return res.json()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_b64(b64).convert("RGB"), dtype=np.int16)


def test_options_has_a1111s_keys_and_takes_a_round_trip(server):
    """GET returns A1111's keys; POSTing the whole dict back (Open WebUI) succeeds; a setting sdrt records is
    returned as set."""
    options = server.get("/sdapi/v1/options").json()
    expected = {"samples_save", "sd_vae", "jpeg_quality", "sd_checkpoints_limit", "CLIP_stop_at_last_layers"}
    assert expected <= set(options)
    assert len(options) > 250 and options["sd_vae"] == "Automatic"
    assert server.post("/sdapi/v1/options", options).status_code == 200
    assert server.post("/sdapi/v1/options", {"jpeg_quality": 91, "quicksettings_list": ["sd_vae"]}).status_code == 200
    again = server.get("/sdapi/v1/options").json()
    assert again["jpeg_quality"] == 91 and again["quicksettings_list"] == ["sd_vae"]
    server.post("/sdapi/v1/options", {"jpeg_quality": 80, "quicksettings_list": ["sd_model_checkpoint"]})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"token_merging_ratio": 0.5}, "token merging"),  # would change images
        ({"sd_vae": "kl-f8-anime2.ckpt"}, "no --vae-dir"),
        ({"eta_ancestral": 0.5}, "request's eta"),
        ({"jpeg_quality": "high"}, "number"),  # A1111's type
        ({"outdir_samples": "/tmp"}, "server path"),
        ({"not_an_a1111_setting": 1}, "an A1111 setting"),
    ],
)
def test_options_refused_name_the_key(server, body, message):
    res = server.post("/sdapi/v1/options", body)
    assert res.status_code == 422, res.text
    detail = res.json()["detail"][0]
    assert detail["loc"] == ["body", "options", next(iter(body))] and message in detail["msg"]


def test_options_accepted_at_defaults_and_in_override_settings(server):
    assert server.post("/sdapi/v1/options", {"token_merging_ratio": 0, "sd_vae": "None"}).status_code == 200
    server.post("/sdapi/v1/options", {"sd_vae": "Automatic"})
    generate(server, override_settings={"jpeg_quality": 50, "sd_vae": "Automatic"})
    res = server.post("/sdapi/v1/txt2img", {**SMALL, "override_settings": {"token_merging_ratio": 0.3}})
    assert res.status_code == 422 and res.json()["detail"][0]["loc"][-1] == "token_merging_ratio"


def test_embeddings_listed_and_used(server, tiny_sd, extras_dir):
    """`loaded` holds what fits the model's text encoder (shape = width, vectors = count), `skipped` the rest;
    an HTTP prompt uses the embedding (its image is the Python API's with the folder, not the one without)."""
    listing = server.get("/sdapi/v1/embeddings").json()
    assert listing["loaded"]["mycat"]["shape"] == WIDTH and listing["loaded"]["mycat"]["vectors"] == 3
    assert set(listing["skipped"]) == {"wide"}
    from sdrt import Pipeline

    body = generate(server, prompt="a mycat")
    kwargs = dict(**SMALL, seed=3, rng="gpu", progress=False)
    with_ti = Pipeline.load(tiny_sd[1], embeddings=extras_dir / "embeddings").generate("a mycat", **kwargs)[0]
    without = Pipeline.load(tiny_sd[1]).generate("a mycat", **kwargs)[0]
    assert np.array_equal(pixels(body["images"][0]), np.asarray(with_ti.convert("RGB"), dtype=np.int16))
    assert np.abs(pixels(body["images"][0]) - np.asarray(without.convert("RGB"), dtype=np.int16)).max() > 5


def test_refresh_embeddings_picks_up_a_new_file(server, extras_dir):
    before = generate(server, prompt="a newdog")["images"][0]
    write_embedding(extras_dir / "embeddings" / "newdog.pt", 2, seed=9)
    try:
        assert generate(server, prompt="a newdog")["images"][0] == before  # not loaded yet: plain text
        assert server.post("/sdapi/v1/refresh-embeddings").status_code == 200
        assert generate(server, prompt="a newdog")["images"][0] != before
    finally:
        (extras_dir / "embeddings" / "newdog.pt").unlink()
        server.post("/sdapi/v1/refresh-embeddings")


def test_styles_listed_applied_and_broken_rows_named(server):
    styles = server.get("/sdapi/v1/prompt-styles").json()
    assert styles == [
        {"name": "cinematic", "prompt": "{prompt}, cinematic lighting", "negative_prompt": "blurry"},
        {"name": "plain", "prompt": "oil painting", "negative_prompt": ""},
    ]
    log = server.log()
    assert "styles.csv line 4: no name" in log and "styles.csv line 5 ('extra')" in log
    body = generate(server, styles=["cinematic", "plain"], negative_prompt="ugly")
    info = json.loads(body["info"])
    assert info["prompt"] == "a cat, cinematic lighting, oil painting" and info["styles"] == ["cinematic", "plain"]
    assert info["negative_prompt"] == "ugly, blurry"
    direct = generate(server, prompt="a cat, cinematic lighting, oil painting", negative_prompt="ugly, blurry")
    assert direct["images"] == body["images"]
    assert generate(server, styles=["plain"])["images"] != generate(server)["images"]  # can fail: styles matter
    res = server.post("/sdapi/v1/txt2img", {**SMALL, "styles": ["nope"]})
    assert res.status_code == 422 and res.json()["detail"][0]["loc"] == ["body", "styles[0]"]
    assert "cinematic" in res.text


def test_merge_prompts_as_a1111():
    from sdrt.server.styles import merge_prompts

    assert merge_prompts("{prompt}, x", "a cat") == "a cat, x"
    assert merge_prompts("x", " a cat ") == "a cat, x"
    assert merge_prompts("x", "") == "x" and merge_prompts("", "a") == "a"
    assert merge_prompts("{prompt} and {prompt}", "a") == "a and a"


def test_old_styles_format_and_missing_columns(tmp_path):
    from sdrt.server.styles import StyleDatabase

    (tmp_path / "old.csv").write_text("\ufeffname,text\nold,a style\n")
    assert StyleDatabase(tmp_path / "old.csv").styles["old"].prompt == "a style"
    (tmp_path / "bad.csv").write_text("title,words\nx,y\n")
    db = StyleDatabase(tmp_path / "bad.csv")
    assert db.styles == {} and "line 2" in db.warnings[0]


def test_skip_ends_the_current_image_and_goes_on(server):
    """Skip during the first of two batches: it ends early (an image unlike the full run's) and the second batch
    is the full run's image for seed + 1."""
    steps, result = 60, {}
    worker = threading.Thread(target=lambda: result.update(body=generate(server, n_iter=2, steps=steps, seed=20)))
    worker.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = server.get("/sdapi/v1/progress").json()["state"]
        if state["job_no"] == 0 and state["sampling_step"] >= 2:
            break
    assert server.post("/sdapi/v1/skip").status_code == 200
    worker.join()
    images = result["body"]["images"]
    assert len(images) == 2
    full_first = generate(server, steps=steps, seed=20)["images"][0]
    full_second = generate(server, steps=steps, seed=21)["images"][0]
    assert np.abs(pixels(images[0]) - pixels(full_first)).max() > 5
    assert np.array_equal(pixels(images[1]), pixels(full_second))


def test_listing_routes_are_truthful(server, extras_dir):
    memory = server.get("/sdapi/v1/memory").json()
    assert memory["ram"]["used"] > 0 and memory["ram"]["total"] > memory["ram"]["used"]
    assert memory["cuda"] == {"error": "unavailable"} or "system" in memory["cuda"]
    assert server.get("/sdapi/v1/scripts").json() == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}
    info = server.get("/sdapi/v1/script-info").json()
    assert {(s["name"], s["is_img2img"], s["is_alwayson"]) for s in info} == {
        ("controlnet", False, True),
        ("controlnet", True, True),
    }
    for path in ("extensions", "face-restorers", "hypernetworks", "sd-vae", "realesrgan-models"):
        assert server.get(f"/sdapi/v1/{path}").json() == [], path
    flags = server.get("/sdapi/v1/cmd-flags").json()
    assert flags["embeddings_dir"] == "embeddings" and flags["api_auth"] is None and flags["listen"] is False
    assert str(extras_dir) not in json.dumps(flags)  # no server paths
    for path in ("refresh-loras", "refresh-vae", "refresh-checkpoints"):
        assert server.post(f"/sdapi/v1/{path}").status_code == 200


def test_bad_extras_arguments_exit_2(tiny_sd, tmp_path):
    from sdrt.cli import main

    assert main(["serve", "-m", str(tiny_sd[1]), "--styles-file", str(tmp_path / "none.csv")]) == 2
    assert main(["serve", "-m", str(tiny_sd[1]), "--embeddings-dir", str(tmp_path / "none")]) == 2
