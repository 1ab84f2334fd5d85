"""SDXL's refiner over HTTP: A1111's refiner_checkpoint (a title of the same --models-dir) and refiner_switch_at
give Pipeline.generate's refiner and refiner_switch_at, bit for bit; bad pairs answer 422 naming the field."""

import numpy as np
import pytest
from server_fixture import SMALL, decode_b64, running_server

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def sdxl_server(tiny_sdxl, tmp_path_factory):
    models = tmp_path_factory.mktemp("sdxl-models")
    (models / "base").symlink_to(tiny_sdxl["base"][1], target_is_directory=True)
    (models / "refiner").symlink_to(tiny_sdxl["refiner"][1], target_is_directory=True)
    with running_server(None, tmp_path_factory.mktemp("sdxl-server"), "--models-dir", str(models), "-m", "base") as s:
        yield s


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_refiner_checkpoint_is_the_pipelines_refiner(sdxl_server, tiny_sdxl):
    from sdrt import Pipeline

    titles = {m["filename"]: m["title"] for m in sdxl_server.get("/sdapi/v1/sd-models").json()}
    body = {"prompt": "a cat", **SMALL, "seed": 4, "refiner_checkpoint": titles["refiner"], "refiner_switch_at": 0.5}
    res = sdxl_server.post("/sdapi/v1/txt2img", body)
    assert res.status_code == 200, res.text
    got = pixels(decode_b64(res.json()["images"][0]))
    base = Pipeline.load(tiny_sdxl["base"][1])
    kwargs = dict(**SMALL, seed=4, rng="gpu", progress=False)
    want = base.generate("a cat", refiner=str(tiny_sdxl["refiner"][1]), refiner_switch_at=0.5, **kwargs)[0]
    assert np.array_equal(got, pixels(want))
    assert np.abs(got - pixels(base.generate("a cat", **kwargs)[0])).max() > 0  # the refiner changed it


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"refiner_checkpoint": "nope", "refiner_switch_at": 0.5}, "refiner_checkpoint"),
        ({"refiner_checkpoint": "refiner"}, "refiner_switch_at"),
        ({"refiner_checkpoint": "refiner", "refiner_switch_at": 1.0}, "refiner_switch_at"),
    ],
)
def test_bad_refiner_fields_are_422(sdxl_server, fields, field):
    res = sdxl_server.post("/sdapi/v1/txt2img", {"prompt": "a cat", **SMALL, **fields})
    assert res.status_code == 422 and res.json()["detail"][0]["loc"][-1] == field, res.text
