"""Schemathesis fuzz of `sdrt serve` from its OpenAPI schema (the Ray app's: test_server_ray.py)."""

import pytest
from openapi_fuzz import fuzz, fuzz_values
from server_fixture import running_server

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("schemathesis", reason="the test extra is not installed")

# Small limits: every request the server accepts is a quick one on the tiny model.
FUZZ_SERVER_ARGS = ("--max-steps", "8", "--max-pixels", str(64 * 64), "--max-batch-size", "2", "--max-images", "2")
EXAMPLES = 20  # per operation and mode (schema-valid, schema-invalid)


def test_fuzz_sdrt_serve(tiny_sd, tmp_path):
    """A few hundred generated requests: no undeclared 5xx, no hang, and the server still generates after."""
    with running_server(tiny_sd[1], tmp_path, *FUZZ_SERVER_ARGS) as server:
        statuses = fuzz(server.url, examples=EXAMPLES)
        total = sum(statuses.values())
        print(f"\nfuzz sdrt serve: {total} cases, statuses {dict(sorted(statuses.items()))}")
        assert total >= 200 and statuses[200] > 0 and statuses[422] > 0
        res = server.post("/sdapi/v1/txt2img", {"prompt": "after", "width": 64, "height": 64, "steps": 2})
        assert res.status_code == 200 and len(res.json()["images"]) == 1
        assert server.process.poll() is None


def test_fuzz_sdrt_serve_models_dir(tiny_sd, tmp_path, monkeypatch):
    """The same over `--models-dir` (a model, a broken checkpoint, a file that is not a model) with a VAE folder (a
    broken VAE file) and a ControlNet folder: model switches, refresh/unload/reload, sd-vae/refresh-vae, the
    ControlNet routes and the OpenAI routes among the fuzzed operations; no undeclared 5xx."""
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "cache"))  # exports (gamma, the VAE) stay in the test's folder
    models, vaes = tmp_path / "models", tmp_path / "VAE"
    models.mkdir()
    vaes.mkdir()
    (models / "alpha").symlink_to(tiny_sd[1], target_is_directory=True)
    (models / "broken.safetensors").write_bytes(b"\x00" * 64)
    (models / "notes.txt").write_text("not a model")
    (vaes / "broken.vae.pt").write_bytes(b"\x00" * 64)
    folders = ("--models-dir", str(models), "--vae-dir", str(vaes), "--controlnet-dir", str(tmp_path))
    with running_server(None, tmp_path, *folders, *FUZZ_SERVER_ARGS) as server:
        assert server.post("/sdapi/v1/options", {"sd_vae": "broken.vae.pt"}).status_code == 200
        res = server.post("/sdapi/v1/txt2img", {"prompt": "x", "width": 64, "height": 64, "steps": 1})
        assert res.status_code == 422 and "broken.vae.pt" in res.text  # the broken VAE: one clear error, no 500
        assert server.post("/sdapi/v1/options", {"sd_vae": "Automatic"}).status_code == 200
        statuses = fuzz(server.url, examples=EXAMPLES // 2)
        total = sum(statuses.values())
        print(f"\nfuzz sdrt serve --models-dir: {total} cases, statuses {dict(sorted(statuses.items()))}")
        assert statuses[200] > 0 and statuses[422] > 0
        res = server.post("/sdapi/v1/txt2img", {"prompt": "after", "width": 64, "height": 64, "steps": 2})
        assert res.status_code == 200 and len(res.json()["images"]) == 1
        assert server.process.poll() is None


def test_fuzz_sdrt_serve_with_non_finite_and_oversized_values(tiny_sd, tmp_path):
    """NaN, Infinity, 1e999, huge numbers, long strings and lists, deep nesting in any field of valid bodies: a 422
    naming the field for the non-finite ones, never a 5xx."""
    with running_server(tiny_sd[1], tmp_path, *FUZZ_SERVER_ARGS) as server:
        statuses = fuzz_values(server.url, examples=EXAMPLES)
        total = sum(statuses.values())
        print(f"\nfuzz sdrt serve, bad values: {total} cases, statuses {dict(sorted(statuses.items()))}")
        assert total >= 60 and statuses[422] > 0
        assert server.process.poll() is None
