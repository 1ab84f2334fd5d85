"""ControlNet: preprocessors (canny against OpenCV), control maps and resize modes, unit validation, infotext written
and read back, the CLI and the HTTP API (the extension's alwayson_scripts and /controlnet routes)."""

import base64
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from sdrt import Pipeline
from sdrt.cli import main
from sdrt.errors import InvalidOption, ModelError
from sdrt.runtime import control_preprocess as pre
from sdrt.runtime.control_maps import fit_map, pixel_perfect_resolution
from sdrt.runtime.controlnet import ControlNetUnit, check_unit
from sdrt.runtime.controlnet_infotext import infotext_units
from sdrt.runtime.infotext import parse_infotext

SIZE = 64


def photo(h=120, w=160, seed=0) -> np.ndarray:
    """A noisy colour image with smooth gradients and a sharp-edged block: (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / 50
    img = np.stack([128 + 100 * np.sin(3 * x + 2 * y), 128 + 90 * np.cos(5 * x * y), 128 + 60 * np.sin(7 * x)], -1)
    img[h // 4 : h // 2, w // 4 : w // 2] = (200, 30, 40)
    return (img + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)


def strokes(size=SIZE) -> Image.Image:
    img = np.zeros((size, size, 3), np.uint8)
    img[10:12, 8:50] = 255
    img[20:56, 30:32] = 255
    return Image.fromarray(img)


@pytest.mark.parametrize(("low", "high"), [(100, 200), (50, 100), (10, 30), (150, 120), (100.7, 200.2)])
def test_canny_matches_opencv(low, high):
    cv2 = pytest.importorskip("cv2")
    for image in (photo(), photo(97, 61, seed=1)[..., :1]):  # colour (largest channel gradient) and grey
        want = cv2.Canny(image if image.shape[2] == 3 else image[..., 0], low, high)
        got = pre.canny(image, low, high)
        assert np.array_equal(got, want)
        assert want.any() and not want.all()
    assert not np.array_equal(pre.canny(photo(), low + 40, high + 40), cv2.Canny(photo(), low, high))  # can fail


def test_gaussian_blur_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    image = photo().astype(np.float32)
    for sigma in (0.5, 5.0):
        assert np.abs(pre.gaussian_blur(image, sigma) - cv2.GaussianBlur(image, (0, 0), sigma)).max() < 1e-3


def test_model_free_modules():
    image = photo()
    assert np.array_equal(pre.run_invert(image), 255 - image)
    gray = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    thresholded = pre.run_threshold(image, 127)
    assert set(np.unique(thresholded)) == {0, 255} and np.array_equal(thresholded[..., 0] == 255, gray > 127)
    assert pre.run_tile_resample(image, 1.0) is image
    assert pre.run_tile_resample(image, 2.0).shape == (60, 80, 3)
    xdog = pre.run_scribble_xdog(image, 32)
    assert set(np.unique(xdog)) <= {0, 255} and xdog.any()


def test_resize_modes():
    left_right = np.zeros((40, 80, 3), np.uint8)
    left_right[:, :20] = 255  # the left quarter white
    just = fit_map(left_right, 40, 40, "Just Resize", binary=True)
    assert just.shape == (40, 40, 3) and just[:, :8].all() and not just[:, 12:].any()
    cropped = fit_map(left_right, 40, 40, "Crop and Resize", binary=True)  # scale 1, keep the centre 40 columns
    assert np.array_equal(cropped, left_right[:, 20:60])
    filled = fit_map(left_right, 40, 40, "Resize and Fill", binary=True)  # scale 0.5: 40x20 band, border filled
    assert filled.shape == (40, 40, 3) and filled[10:30, :8].all() and not filled[10:30, 12:].any()
    assert not filled[:10].any()  # the median edge colour of the map is black


def test_pixel_perfect_resolution():
    # the extension's estimate: the raw image's short side times the larger (crop) or smaller (fill) scale
    assert pixel_perfect_resolution((300, 400), (512, 768), "Crop and Resize") == round(300 * max(512 / 300, 768 / 400))
    assert pixel_perfect_resolution((300, 400), (512, 768), "Resize and Fill") == round(300 * min(512 / 300, 768 / 400))


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("module", "depth_midas", "controlnets[0].module"),
        ("weight", 2.5, "controlnets[0].weight"),
        ("weight", float("nan"), "controlnets[0].weight"),
        ("guidance_end", -0.1, "controlnets[0].guidance_end"),
        ("control_mode", "Prompt first", "controlnets[0].control_mode"),
        ("control_mode", 3, "controlnets[0].control_mode"),
        ("resize_mode", "Stretch", "controlnets[0].resize_mode"),
        ("processor_res", 10, "controlnets[0].processor_res"),
        ("threshold_a", 300, "controlnets[0].threshold_a"),
        ("image", None, "controlnets[0].image"),
    ],
)
def test_bad_unit_fields_are_named(field, value, named):
    unit = ControlNetUnit("model", strokes(), module="canny")
    with pytest.raises(InvalidOption) as e:
        check_unit(ControlNetUnit(**{**unit.__dict__, field: value}), 0)
    assert e.value.field == named


def test_unit_labels_and_defaults():
    unit = check_unit(ControlNetUnit("m", strokes(), module="Canny", control_mode=2, resize_mode="Envelope (Outer Fit)",
                                     threshold_a=-1, processor_res=-1), 0)  # fmt: skip
    assert unit.module == "canny" and unit.control_mode == "ControlNet is more important"
    assert unit.resize_mode == "Resize and Fill" and (unit.threshold_a, unit.threshold_b) == (100, 200)
    assert unit.processor_res == 512
    assert check_unit(ControlNetUnit("m", strokes(), module="invert"), 0).module.startswith("invert (")


@pytest.fixture(scope="module")
def pipeline(tiny_controlnets):
    return Pipeline.load(tiny_controlnets[1])


def generate(pipeline, units, **kw):
    return pipeline.generate("a grey squirrel", steps=3, width=SIZE, height=SIZE, seed=1, progress=False,
                             controlnets=units, **kw)  # fmt: skip


def test_infotext_written_and_read_back(pipeline, tiny_controlnets):
    folder = tiny_controlnets[2][0][1]
    units = [
        ControlNetUnit(folder, photo(), module="canny", weight=0.8, threshold_a=90, guidance_end=0.7),
        ControlNetUnit(tiny_controlnets[2][1][1], strokes(), control_mode="My prompt is more important"),
    ]
    [image] = generate(pipeline, units)
    params = parse_infotext(image.info["parameters"])
    assert params["ControlNet 0"] == (
        "Module: canny, Model: cn0 [" + json.loads((folder / "controlnet.json").read_text())["source"]["sha256"][:8]
        + "], Weight: 0.8, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 90, Threshold B: 200, "
        "Guidance Start: 0, Guidance End: 0.7, Pixel Perfect: False, Control Mode: Balanced"
    )  # fmt: skip
    read = infotext_units(params)
    assert len(read) == 2 and read[1]["control_mode"] == "My prompt is more important"
    want = {"module": "canny", "weight": 0.8, "threshold_a": 90.0, "threshold_b": 200.0, "guidance_start": 0.0,
            "guidance_end": 0.7, "processor_res": 512, "pixel_perfect": False,
            "resize_mode": "Crop and Resize"}  # fmt: skip
    assert {k: read[0][k] for k in want} == want
    assert read[0]["model"].startswith("cn0 [")


def test_control_maps_returned(pipeline, tiny_controlnets):
    folder = tiny_controlnets[2][0][1]
    image = photo(96, 128)
    out = generate(pipeline, [ControlNetUnit(folder, image, module="canny", processor_res=96)], control_maps=True)
    assert len(out) == 2 and "parameters" not in out[1].info
    # canny at the image's own size (short side 96), scaled by 2/3 to cover 64x64 (85x64), the centre cropped
    edges = Image.fromarray(pre.canny(image, 100, 200)).resize((85, SIZE), Image.Resampling.LANCZOS)
    want = np.asarray(edges)[:, 10 : 10 + SIZE]
    assert np.array_equal(np.asarray(out[1])[..., 0], np.where(want >= 128, 255, 0))


def test_pipeline_errors(pipeline, tiny_controlnets, tiny_sd, tmp_path):
    folder = tiny_controlnets[2][0][1]
    with pytest.raises(InvalidOption) as e:
        generate(pipeline, [ControlNetUnit(tmp_path / "nothing", strokes())])
    assert e.value.field == "controlnets[0].model"
    with pytest.raises(InvalidOption) as e:
        generate(pipeline, [ControlNetUnit(folder, strokes()), ControlNetUnit(folder, tmp_path / "missing.png")])
    assert e.value.field == "controlnets[1].image"
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InvalidOption) as e:
        generate(pipeline, [ControlNetUnit(folder, tmp_path / "bad.png")])
    assert e.value.field == "controlnets[0].image"
    sdxl_net = tmp_path / "sdxl-cn"  # an SDXL ControlNet (its manifest says so) on an SD 1.x model
    shutil.copytree(folder, sdxl_net)
    manifest = json.loads((sdxl_net / "controlnet.json").read_text())
    (sdxl_net / "controlnet.json").write_text(json.dumps({**manifest, "family": "sdxl"}))
    with pytest.raises(InvalidOption, match="a ControlNet for sd1 models") as e:
        generate(pipeline, [ControlNetUnit(sdxl_net, strokes())])
    assert e.value.field == "controlnets[0].model"
    with pytest.raises(ModelError, match="--controlnet"):  # a model exported without the unet_controlnet graph
        Pipeline.load(tiny_sd[1]).generate(
            "a", steps=1, progress=False, controlnets=[ControlNetUnit(folder, strokes())]
        )
    disabled = generate(pipeline, [ControlNetUnit(folder, strokes(), enabled=False)])
    assert "ControlNet" not in disabled[0].info["parameters"]


def test_cli_generate_with_controlnet(tiny_controlnets, tmp_path, capsys):
    _, model, [(_, folder), _] = tiny_controlnets
    strokes().save(tmp_path / "edges.png")
    args = ["generate", "a cat", "-m", str(model), "--steps", "2", "--seed", "3", "-o", str(tmp_path / "out")]
    unit = ["--controlnet", str(folder), str(tmp_path / "edges.png")]
    assert main([*args, *unit, "weight=0.5", "guidance_end=0.5", "--control-maps"]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["00000-3.png", "00000-controlnet-0.png"]
    text = Image.open(tmp_path / "out" / "00000-3.png").info["parameters"]
    assert "Weight: 0.5" in text and "Guidance End: 0.5" in text
    # --from-png: the image's unit settings, the model and image from the command line
    assert main(["generate", "-m", str(model), "--from-png", str(tmp_path / "out" / "00000-3.png"), "-o",
                 str(tmp_path / "again"), *unit]) == 0  # fmt: skip
    again = next((tmp_path / "again").iterdir())
    assert Image.open(again).info["parameters"] == text
    capsys.readouterr()
    assert main([*args, *unit, "weight=heavy"]) == 2
    assert "--controlnet[0].weight: got 'heavy'" in capsys.readouterr().err
    assert main([*args, *unit, "strength=1"]) == 2


@pytest.fixture(scope="module")
def client(pipeline, tiny_controlnets):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sdrt.server.app import create_app

    pipeline.controlnets.directory = tiny_controlnets[2][0][1].parent
    return TestClient(create_app(pipeline))


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_http_routes(client):
    models = client.get("/controlnet/model_list").json()["model_list"]
    assert [m.split(" [")[0] for m in models] == ["cn0", "cn1"]
    modules = client.get("/controlnet/module_list").json()
    assert modules["module_list"][:2] == ["none", "canny"]
    assert modules["module_detail"]["canny"]["sliders"][1] == {
        "name": "Threshold A",
        "value": 100,
        "min": 1,
        "max": 255,
    }
    assert client.get("/controlnet/version").json() == {"version": 2}


def test_http_txt2img_with_units(client, pipeline):
    models = client.get("/controlnet/model_list").json()["model_list"]
    request = {"prompt": "a cat", "width": SIZE, "height": SIZE, "steps": 3, "seed": 4}
    unit = {"model": models[0], "module": "canny", "image": b64(Image.fromarray(photo(64, 64))), "weight": 0.9}
    body = client.post("/sdapi/v1/txt2img", json={**request, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert body.status_code == 200, body.text
    images = body.json()["images"]
    assert len(images) == 2  # the image and the detected map (save_detected_map defaults to true)
    info = json.loads(body.json()["info"])
    assert f'ControlNet 0: "Module: canny, Model: {models[0]}, Weight: 0.9' in info["infotexts"][0]
    same = ControlNetUnit(models[0], photo(64, 64), module="canny", weight=0.9)  # A1111's default noise: GPU
    direct = pipeline.generate("a cat", width=SIZE, height=SIZE, steps=3, seed=4, sampler="Euler", cfg_scale=7,
                               rng="gpu", progress=False, controlnets=[same])  # fmt: skip
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(images[0]))).convert("RGB"))
    assert np.array_equal(got, np.asarray(direct[0]))
    off = {**unit, "save_detected_map": False, "enabled": False}
    body = client.post("/sdapi/v1/txt2img", json={**request, "alwayson_scripts": {"ControlNet": {"args": [off]}}})
    assert body.status_code == 200 and len(body.json()["images"]) == 1


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"model": "cn9 [00000000]"}, "model"),
        ({"module": "openpose"}, "module"),
        ({"weight": 3}, "weight"),
        ({"image": "bm90IGFuIGltYWdl"}, "image"),
        ({"image": None}, "image"),
        ({"control_mode": "Prompt first"}, "control_mode"),
    ],
)
def test_http_bad_units_are_422_naming_the_field(client, change, loc):
    models = client.get("/controlnet/model_list").json()["model_list"]
    unit = {"model": models[0], "image": b64(strokes()), **change}
    body = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "width": SIZE, "height": SIZE, "steps": 1,
                                                  "alwayson_scripts": {"controlnet": {"args": [unit]}}})  # fmt: skip
    assert body.status_code == 422, body.text
    assert body.json()["detail"][0]["loc"] == ["body", "alwayson_scripts", "controlnet", "args[0]", loc]


def test_single_file_export_matches_diffusers_folder(tiny_controlnets, tmp_path, capsys):
    """The extension's .pth / .safetensors layout (through the weights-only unpickler for .pth), with --config, gives
    the same graph outputs as the diffusers folder; a pickle holding an object is refused without running it."""
    import onnxruntime as ort
    import torch
    from safetensors.torch import save_file
    from tiny_controlnet import to_extension_state_dict

    _, _, [(net, folder), _] = tiny_controlnets
    weights = to_extension_state_dict(net)
    torch.save(weights, tmp_path / "control_tiny.pth")
    save_file(weights, tmp_path / "control_tiny.safetensors")
    config = str(folder.parent.parent / "cn0")  # the diffusers folder the ControlNet was saved to
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((1, 4, 8, 8), np.float32), "timestep": np.array([500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 77, 32), np.float32),
             "controlnet_cond": rng.random((1, 3, 64, 64), np.float32)}  # fmt: skip

    def outputs(model_dir):
        session = ort.InferenceSession(str(model_dir / "controlnet" / "model.onnx"))
        return session.run(None, feeds)

    want = outputs(folder)
    for name in ("control_tiny.pth", "control_tiny.safetensors"):
        out = tmp_path / name.replace(".", "-")
        assert main(["export-controlnet", str(tmp_path / name), "-o", str(out), "--config", config]) == 0
        for got, ref in zip(outputs(out), want, strict=True):
            assert np.abs(got - ref).max() < 1e-5
    # the extension's own files come with a cldm YAML instead: the same conversion, from --original-config
    import yaml
    from tiny_controlnet import build_tiny_controlnet, cldm_config

    pipe = tiny_controlnets[0]
    published = build_tiny_controlnet(pipe.unet, tmp_path / "published", embedding=(16, 32, 96, 256), groups=32)
    torch.save(to_extension_state_dict(published), tmp_path / "control_published.pth")
    (tmp_path / "cldm.yaml").write_text(yaml.safe_dump(cldm_config(pipe)))
    assert main(["export-controlnet", str(tmp_path / "control_published.pth"), "-o", str(tmp_path / "from-yaml"),
                 "--original-config", str(tmp_path / "cldm.yaml")]) == 0  # fmt: skip
    assert main(["export-controlnet", str(tmp_path / "published"), "-o", str(tmp_path / "from-folder")]) == 0
    for got, ref in zip(outputs(tmp_path / "from-yaml"), outputs(tmp_path / "from-folder"), strict=True):
        assert np.abs(got - ref).max() < 1e-5
    broken = dict(weights)
    broken.pop("control_model.zero_convs.0.0.weight")
    save_file(broken, tmp_path / "broken.safetensors")  # can fail: a missing zero conv is noticed
    capsys.readouterr()
    assert main(["export-controlnet", str(tmp_path / "broken.safetensors"), "-o", str(tmp_path / "b"), "--config",
                 config]) == 2  # fmt: skip
    assert "could not load the ControlNet" in capsys.readouterr().err

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled code ran",))

    torch.save({"state_dict": weights, "extra": Payload()}, tmp_path / "evil.pth")
    capsys.readouterr()
    assert main(["export-controlnet", str(tmp_path / "evil.pth"), "-o", str(tmp_path / "e"), "--config", config]) == 2
    out = capsys.readouterr()
    assert "refusing" in out.err and "unpickled code ran" not in out.out
    assert not (tmp_path / "e").exists()


def test_tensorrt_profile_covers_the_residual_inputs(tiny_controlnets):
    """`sdrt build` plans the unet_controlnet graph like the UNet, its residual axes at 1/2, 1/4, ... of the latent."""
    from sdrt.engines.plan import ShapeRanges, plan_profile
    from sdrt.runtime.manifest import Manifest

    manifest = Manifest.load(tiny_controlnets[1])
    profile = plan_profile("unet_controlnet", manifest.models["unet_controlnet"]["inputs"], ShapeRanges(), 8)
    assert profile["sample"][2] == (8, 4, 128, 128)  # batch 4 x 2 (guided), 1024 px
    assert profile["down_block_res_0"][2] == (8, 32, 128, 128)
    assert profile["mid_block_res"][0] == (1, 64, 16, 16)  # 256 px at 1/2 of the latent


def test_http_units_with_a_models_folder(pipeline, tiny_controlnets, tiny_sd, tmp_path):
    """`sdrt serve --models-dir --controlnet-dir`: units are validated against the request's model (its
    override_settings), not the server's default: on the model with the ControlNet UNet the image is the Python
    API's; on one without, a 422 saying so (the twin); an unknown ControlNet is a 422 naming the unit's field."""
    pytest.importorskip("fastapi")
    from server_fixture import running_server

    models = tmp_path / "models"
    models.mkdir()
    (models / "withcn").symlink_to(tiny_controlnets[1], target_is_directory=True)
    (models / "plain").symlink_to(tiny_sd[1], target_is_directory=True)
    args = ("--models-dir", str(models), "-m", "plain", "--controlnet-dir", str(tiny_controlnets[2][0][1].parent))
    with running_server(None, tmp_path, *args) as server:
        names = server.get("/controlnet/model_list").json()["model_list"]
        assert [m.split(" [")[0] for m in names] == ["cn0", "cn1"]
        unit = {"model": names[1], "module": "canny", "image": b64(Image.fromarray(photo(64, 64))), "weight": 0.8}
        request = {"prompt": "a cat", "width": SIZE, "height": SIZE, "steps": 3, "seed": 4,
                   "alwayson_scripts": {"controlnet": {"args": [unit]}}}  # fmt: skip
        body = server.post("/sdapi/v1/txt2img", {**request, "override_settings": {"sd_model_checkpoint": "withcn"}})
        assert body.status_code == 200, body.text
        same = ControlNetUnit(str(tiny_controlnets[2][1][1]), photo(64, 64), module="canny", weight=0.8)  # cn1
        direct = pipeline.generate("a cat", width=SIZE, height=SIZE, steps=3, seed=4, rng="gpu", progress=False,
                                   controlnets=[same])  # fmt: skip
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(body.json()["images"][0]))).convert("RGB"))
        assert np.array_equal(got, np.asarray(direct[0]))
        plain = server.post("/sdapi/v1/txt2img", request)  # the default model has no ControlNet UNet
        assert plain.status_code == 422 and "unet_controlnet" in plain.text, plain.text
        bad = {**unit, "model": "cn9"}
        res = server.post("/sdapi/v1/txt2img", {**request, "alwayson_scripts": {"controlnet": {"args": [bad]}},
                                                "override_settings": {"sd_model_checkpoint": "withcn"}})  # fmt: skip
        assert res.status_code == 422 and res.json()["detail"][0]["loc"][-1] == "model"
