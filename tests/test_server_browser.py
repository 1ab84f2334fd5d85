"""The web page in headless Chromium (Debian's chromium, driven by Playwright): txt2img, inpainting, PNG Info.

Set SDRT_UPDATE_SCREENSHOT=1 to write the page's screenshot to docs/webui.png (the README shows it).
"""

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_fixture import gradient

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip
SCREENSHOT = Path(__file__).parent.parent / "docs" / "webui.png"
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed")


@pytest.fixture(scope="module")
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()


def gallery_image(page, index: int = 0) -> Image.Image:
    """The gallery's INDEX-th image (0: the newest), decoded from its data: URL."""
    src = page.locator(".item img").nth(index).get_attribute("src")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")


def test_page_txt2img_inpaint_and_png_info(page, sdrt_server, tmp_path):
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(sdrt_server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#sampler option").count() >= 10 and "[" in page.inner_text("#model")

    # txt2img: type a prompt, generate, see the image and its infotext
    page.fill("#prompt", "a red fox in the snow")
    page.fill("#negative_prompt", "blurry")
    for field, value in (("#width", "64"), ("#height", "64"), ("#steps", "12"), ("#seed", "42")):
        page.fill(field, value)
    page.select_option("#sampler", "Euler")
    page.fill("#batch_size", "2")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('.item img').length === 2")
    assert "2 image(s)" in page.inner_text("#status")
    infotexts = page.locator(".item pre").all_inner_texts()
    assert any("Seed: 42," in t for t in infotexts) and any("Seed: 43," in t for t in infotexts)
    assert all(t.startswith("a red fox in the snow\nNegative prompt: blurry\nSteps: 12") for t in infotexts)
    assert gallery_image(page).size == (64, 64)
    assert page.locator(".item a[download]").first.get_attribute("download").endswith(".png")
    page.fill("#seed", "-1")
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "42"

    # inpaint: upload an image, paint a stroke on the left of the canvas, generate
    init = gradient(64, 64)
    init_path = tmp_path / "init.png"
    init.save(init_path)
    page.click("button[data-tab='inpaint']")
    page.fill("#batch_size", "1")
    page.set_input_files("#inpaint-file", str(init_path))
    page.wait_for_function("document.getElementById('inpaint-mask').width === 64")
    page.fill("#brush-size", "48")  # screen pixels: 8 image pixels on the 384-pixel wide canvas
    page.locator("#inpaint-mask").scroll_into_view_if_needed()
    box = page.locator("#inpaint-mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.1)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.9, steps=8)
    page.mouse.up()
    painted = page.evaluate(
        "() => { const c = document.getElementById('inpaint-mask'); const d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data; let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0;"
        " return n; }"
    )
    assert 100 < painted < 64 * 64 // 2, painted
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('.item img').length === 3")
    out = np.asarray(gallery_image(page), dtype=np.int16)
    assert "Mask blur: 4" in page.locator(".item pre").first.inner_text()
    # the stroke is on the left tenth: the right half is the original, bit for bit (paste-back outside the mask)
    assert np.array_equal(out[:, 32:], np.asarray(init, dtype=np.int16)[:, 32:])
    assert np.abs(out[:, :10] - np.asarray(init, dtype=np.int16)[:, :10]).max() > 10
    page.wait_for_selector("#generate:not([disabled])")
    shot = tmp_path / "webui.png"
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(300)  # the progress bar's CSS transition
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("SDRT_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)

    # img2img and outpaint tabs: upload, generate, see the result (outpaint: 32 pixels more on the right)
    page.click("button[data-tab='img2img']")
    page.set_input_files("#img2img-file", str(init_path))
    page.fill("#img2img-strength", "0.5")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('.item img').length === 4")
    assert "Denoising strength: 0.5" in page.locator(".item pre").first.inner_text()
    page.click("button[data-tab='outpaint']")
    page.set_input_files("#outpaint-file", str(init_path))
    page.fill("#out-pixels", "32")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('.item img').length === 5")
    assert gallery_image(page).size == (96, 64)

    # PNG Info: read a generated image's parameters back and send them to the txt2img form
    generated = tmp_path / "generated.png"
    src = page.locator(".item img").last.get_attribute("src")  # the first txt2img image
    generated.write_bytes(base64.b64decode(src.split(",", 1)[1]))
    page.click("button[data-tab='pnginfo']")
    page.set_input_files("#pnginfo-file", str(generated))
    page.wait_for_function("document.getElementById('pnginfo-text').textContent.includes('Seed:')")
    page.fill("#prompt", "")
    page.fill("#steps", "3")
    page.click("#pnginfo-send")
    assert page.input_value("#prompt") == "a red fox in the snow" and page.input_value("#steps") == "12"
    assert page.locator("button[data-tab='txt2img']").get_attribute("class") == "active"
    assert errors == []


def test_page_model_and_style_pickers(page, tiny_sd, tiny_sd_v, tmp_path):
    """--models-dir: the header's picker lists the folder (an unusable file disabled) and switches the server's
    model; the styles picker applies a style from --styles-file to the prompt."""
    from server_fixture import running_server

    models = tmp_path / "models"
    models.mkdir()
    (models / "alpha").symlink_to(tiny_sd[1], target_is_directory=True)
    (models / "beta").symlink_to(tiny_sd_v[1], target_is_directory=True)
    (models / "notes.txt").write_text("not a model")
    (tmp_path / "styles.csv").write_text('name,prompt,negative_prompt\nink,"{prompt}, ink drawing",\n')
    args = ("--models-dir", str(models), "-m", "alpha", "--styles-file", str(tmp_path / "styles.csv"))
    with running_server(None, tmp_path, *args) as server:
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-ready='1']")
        titles = {m["filename"]: m["title"] for m in server.get("/sdapi/v1/sd-models").json()}
        assert page.input_value("#model") == titles["alpha"]
        assert page.locator("#model option[disabled]").all_inner_texts() == [f"{titles['notes.txt']} (unusable)"]
        page.select_option("#model", titles["beta"])
        page.wait_for_function("document.getElementById('status').textContent.startsWith('model:')")
        assert server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles["beta"]
        page.fill("#prompt", "a boat")
        for field, value in (("#width", "64"), ("#height", "64"), ("#steps", "3")):
            page.fill(field, value)
        page.select_option("#styles", ["ink"])
        page.click("#generate")
        page.wait_for_function("document.querySelectorAll('.item img').length >= 1")
        text = page.locator(".item pre").first.inner_text()
        assert text.startswith("a boat, ink drawing\n") and f"Model hash: {titles['beta'][-11:-1]}" in text


def test_page_hires_fix(page, sdrt_server):
    """The txt2img tab's hires fix: the upscaler list (latent modes, then the server's upscalers), a 64 -> 128 image."""
    page.goto(sdrt_server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    options = page.locator("#hr_upscaler option").all_inner_texts()
    assert options[0] == "Latent" and "Lanczos" in options
    for field, value in (("#width", "64"), ("#height", "64"), ("#steps", "3"), ("#batch_size", "1"),
                         ("#hr_second_pass_steps", "2")):  # fmt: skip
        page.fill(field, value)
    page.check("#enable_hr")
    page.select_option("#hr_upscaler", "Lanczos")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('.item img').length >= 1")
    assert gallery_image(page).size == (128, 128)
    assert "Hires upscaler: Lanczos" in page.locator(".item pre").first.inner_text()
