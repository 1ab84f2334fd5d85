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


def test_fuzz_sdrt_serve_models_dir(tiny_sd, tmp_path):
    """The same over `--models-dir` (a model, a broken checkpoint, a file that is not a model): model switches,
    refresh/unload/reload and the OpenAI routes among the fuzzed operations; no undeclared 5xx."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "alpha").symlink_to(tiny_sd[1], target_is_directory=True)
    (models / "broken.safetensors").write_bytes(b"\x00" * 64)
    (models / "notes.txt").write_text("not a model")
    with running_server(None, tmp_path, "--models-dir", str(models), *FUZZ_SERVER_ARGS) as server:
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
