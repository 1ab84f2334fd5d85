"""The web page's form follows the model's family (GET /sdrt/v1/model-form, from Family.form): SD keeps A1111's
fields; FLUX.1 dev shows its Distilled CFG Scale, its defaults (28 steps, CFG 1) and the negative prompt only with
true CFG (CFG > 1); SD 3.5 exported with block gates shows skip-layer guidance. In headless Chromium (Debian's
chromium, driven by Playwright), switching models in the picker."""

import os
import shutil

import pytest
from flow_helpers import exported
from tiny_flux import build_tiny_flux
from tiny_sd3 import build_tiny_sd3

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory):
    return exported(tmp_path_factory.mktemp("page_flux"), build_tiny_flux, variant="dev")[1]


@pytest.fixture(scope="module")
def sd3_gated(tmp_path_factory):
    return exported(tmp_path_factory.mktemp("page_sd3"), build_tiny_sd3, with_t5=False)[1]


def form_of(pipeline) -> dict:
    from fastapi.testclient import TestClient

    from sdrt.server.app import create_app

    with TestClient(create_app(pipeline)) as client:
        return client.get("/sdrt/v1/model-form").json()


def test_model_form_per_family(tiny_pipeline, flux_dev, sd3_gated):
    sd = form_of(tiny_pipeline)
    assert sd == {"family": "sd1", "title": sd["title"], "defaults": {"steps": 20, "cfg_scale": 7.0},
                  "negative_prompt": "always", "fields": []}  # fmt: skip
    flux = form_of(flux_dev)
    assert (flux["defaults"], flux["negative_prompt"]) == ({"steps": 28, "cfg_scale": 1.0}, "with_cfg")
    assert [(f["field"], f["label"], f["default"]) for f in flux["fields"]] == [
        ("distilled_cfg_scale", "Distilled CFG Scale", 3.5)]  # fmt: skip
    sd3 = form_of(sd3_gated)
    assert [f["field"] for f in sd3["fields"]] == ["skip_guidance_layers", "skip_layer_guidance_scale",
                                                   "skip_layer_guidance_start", "skip_layer_guidance_stop"]  # fmt: skip
    assert sd3["negative_prompt"] == "always" and sd3["fields"][0]["kind"] == "ints"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed")
def test_page_switches_to_fluxs_fields_and_generates_with_them(tiny_sd, flux_dev, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    from server_fixture import running_server

    models = tmp_path / "models"
    models.mkdir()
    (models / "sd").symlink_to(tiny_sd[1], target_is_directory=True)
    (models / "flux").symlink_to(flux_dev.manifest.folder, target_is_directory=True)
    with running_server(None, tmp_path, "--models-dir", str(models), "-m", "sd") as server, \
            sync_api.sync_playwright() as p:  # fmt: skip
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(120_000)  # a model switch loads its graphs: slow on a loaded 2-core machine
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-ready='1']")
        assert page.is_visible("#negative-label") and not page.is_visible("#family-fields")
        assert (page.input_value("#steps"), page.input_value("#cfg_scale")) == ("20", "7")
        titles = {m["filename"]: m["title"] for m in server.get("/sdapi/v1/sd-models").json()}
        page.select_option("#model", titles["flux"])
        page.wait_for_function("document.getElementById('status').textContent.startsWith('model:')")
        assert page.input_value("#family-distilled_cfg_scale") == "3.5"
        assert (page.input_value("#steps"), page.input_value("#cfg_scale")) == ("28", "1")
        assert not page.is_visible("#negative-label")  # FLUX at CFG 1: no negative prompt
        page.fill("#cfg_scale", "2")
        assert page.is_visible("#negative-label")  # true CFG: the negative prompt applies
        page.fill("#negative_prompt", "blurry")
        page.fill("#cfg_scale", "1")
        page.fill("#prompt", "a red cat")
        for field, value in (("#width", "64"), ("#height", "64"), ("#steps", "2"), ("#family-distilled_cfg_scale",
                                                                                   "2.5")):  # fmt: skip
            page.fill(field, value)
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('.item img').length === 1")
        text = page.locator(".item pre").first.inner_text()
        assert "Distilled CFG Scale: 2.5" in text and "CFG scale: 1," in text and "Negative prompt" not in text
        page.select_option("#model", titles["sd"])  # back: A1111's fields again
        page.wait_for_function("document.getElementById('status').textContent.startsWith('model:')")
        assert page.is_visible("#negative-label") and not page.is_visible("#family-fields")
        browser.close()
        assert errors == []
