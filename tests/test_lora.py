"""LoRAs on the tiny SD 1.x model: sdrt's merged engines against diffusers' load_lora_weights + fuse_lora, or
(where diffusers reads no such file: LoHa, LoKr, split te/unet weights) the merge applied to diffusers' modules in
torch. Images within PIXEL_TOL /255; each case has a can-fail twin (another weight, a part left out) that breaks it.
"""

import hashlib
import struct
import warnings

import numpy as np
import pytest
import torch
from diffusers_reference import diffusers_run
from tiny_lora import file_keys, make_lora, reference_merge, text_layers, unet_layers

from sdrt.errors import InvalidOption
from sdrt.runtime.lora import ActiveLora, parse_prompt, requested

PIXEL_TOL = 2  # /255
PROMPT = "a photo of a grey squirrel"
RUN = dict(negative_prompt="blue sky", width=64, height=64, steps=6, cfg_scale=7.0, sampler="Euler")
SEED = 11


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16)).max())


def sdrt_image(pipeline, prompt, **kw):
    image = pipeline.generate(prompt, seed=SEED, progress=False, **RUN, **kw)[0]
    return np.asarray(image)[None], image


def fresh_diffusers(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd[1].parent / "diffusers", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save(sd: dict, path, metadata=None):
    from safetensors.torch import save_file

    save_file(sd, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def loras(tiny_sd, tmp_path_factory):
    """{name: state dict} of the test LoRAs, saved in a folder: (folder, dicts)."""
    folder = tmp_path_factory.mktemp("loras")
    pipe = fresh_diffusers(tiny_sd)
    attention = {"unet": unet_layers(pipe.unet), "text_encoder": text_layers(pipe.text_encoder)}
    convs = {"unet": unet_layers(pipe.unet, convs=True)}
    dicts = {
        "style": make_lora(attention, "kohya", seed=1, dtype=torch.float16),  # fp16 file
        "locon": make_lora(convs, "kohya", seed=2, dtype=torch.bfloat16),  # bf16 file, attention and convs
        "peft": make_lora(attention, "peft", seed=3),
        "loha": make_lora(convs, "loha", seed=4),
        "lokr": make_lora({"unet": unet_layers(pipe.unet)}, "lokr", seed=5),
    }
    (folder / "styles").mkdir()
    save(dicts["style"], folder / "styles" / "style.safetensors", {"ss_output_name": "my_style"})
    for name in ("locon", "peft", "loha", "lokr"):
        save(dicts[name], folder / f"{name}.safetensors")
    torch.save({k: v for k, v in dicts["loha"].items()}, folder / "loha_pt.pt")
    sdxl = {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(37, 2)}  # fmt: skip
    save(sdxl, folder / "for_sdxl.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    nothing = {"lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_no_such_block_to_q.lora_up.weight": torch.zeros(32, 2)}  # fmt: skip
    save(nothing, folder / "nothing.safetensors")
    wrong_shape = {"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 77, 1, 1),
                   "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.zeros(64, 2, 1, 1)}  # fmt: skip
    save(wrong_shape, folder / "wrong_shape.safetensors")
    return folder, dicts


@pytest.fixture(scope="module")
def lora_pipeline(tiny_sd, loras):
    from sdrt import Pipeline

    return Pipeline.load(tiny_sd[1], loras=loras[0])


def reference(tiny_sd, merges):
    """diffusers' image after MERGES [(state dict, te weight, unet weight)] applied in torch (tiny_lora)."""
    pipe = fresh_diffusers(tiny_sd)
    parts = {"unet": unet_layers(pipe.unet, convs=True), "text_encoder": text_layers(pipe.text_encoder)}
    for sd, te, unet in merges:
        keys = file_keys(parts)
        present = {k: m for k, m in keys.items() if any(s.startswith(k + ".") for s in sd)}
        reference_merge({k: m for k, m in present.items() if k.startswith("lora_te")}, sd, te)
        reference_merge({k: m for k, m in present.items() if k.startswith("lora_unet")}, sd, unet)
    return diffusers_run(pipe, PROMPT, seeds=(SEED,), **RUN)


def diffusers_fused(tiny_sd, sd, weight):
    """diffusers' own loader: load_lora_weights + fuse_lora(lora_scale=WEIGHT)."""
    pipe = fresh_diffusers(tiny_sd)
    pipe.load_lora_weights(dict(sd))
    pipe.fuse_lora(lora_scale=weight)
    return diffusers_run(pipe, PROMPT, seeds=(SEED,), **RUN)


@pytest.fixture(scope="module")
def base_image(lora_pipeline):
    return sdrt_image(lora_pipeline, PROMPT)[0]


@pytest.mark.parametrize("name", ["style", "locon", "peft"])
def test_matches_diffusers_loader(tiny_sd, loras, lora_pipeline, base_image, name):
    """kohya (UNet attention + text encoder, fp16 file), LoCon (convs, bf16 file) and PEFT, each through diffusers'
    load_lora_weights + fuse_lora; the twin: weight 0.6 where diffusers fused 0.8."""
    want = diffusers_fused(tiny_sd, loras[1][name], 0.8)
    got, _ = sdrt_image(lora_pipeline, f"{PROMPT} <lora:{name}:0.8>")
    twin, _ = sdrt_image(lora_pipeline, f"{PROMPT} <lora:{name}:0.6>")
    assert max_diff(got, want) <= PIXEL_TOL
    assert max_diff(twin, want) > 4 * PIXEL_TOL, "weight 0.6 vs 0.8 went unnoticed"
    assert max_diff(got, base_image) > 10 * PIXEL_TOL, "the LoRA hardly moves the image"


@pytest.mark.parametrize("name", ["loha", "lokr", "loha_pt"])
def test_lycoris_matches_torch_merge(tiny_sd, loras, lora_pipeline, base_image, name):
    """LoHa (convs too) and LoKr against their definitions merged into diffusers' modules (diffusers' loader reads
    neither here); loha_pt is the same LoHa as a torch .pt file, read by the tensor-only unpickler."""
    sd = loras[1][name.removesuffix("_pt")]
    want = reference(tiny_sd, [(sd, 0.9, 0.9)])
    got, _ = sdrt_image(lora_pipeline, f"{PROMPT} <lora:{name}:0.9>")
    assert max_diff(got, want) <= PIXEL_TOL
    assert max_diff(sdrt_image(lora_pipeline, f"{PROMPT} <lora:{name}:0.7>")[0], want) > 4 * PIXEL_TOL
    assert max_diff(got, base_image) > 10 * PIXEL_TOL


def test_two_loras_split_weights(tiny_sd, loras, lora_pipeline):
    """Two LoRAs at once, one with w_te != w_unet (A1111's <lora:name:te:unet>), and a program's loras= added."""
    dicts = loras[1]
    want = reference(tiny_sd, [(dicts["style"], 1.2, 0.5), (dicts["loha"], 0.7, 0.7)])
    got, image = sdrt_image(lora_pipeline, f"{PROMPT} <lora:style:1.2:0.5>", loras={"loha": 0.7})
    assert max_diff(got, want) <= PIXEL_TOL
    assert "<lora:loha:0.7>" in image.info["parameters"].split("\n")[0]  # recorded like A1111's default LoRA
    no_te, _ = sdrt_image(lora_pipeline, f"{PROMPT} <lora:style:0:0.5><lora:loha:0.7>")
    assert max_diff(no_te, want) > 4 * PIXEL_TOL, "the text encoder's part went unnoticed"
    swapped, _ = sdrt_image(lora_pipeline, f"{PROMPT} <lora:style:0.5:1.2><lora:loha:0.7>")
    assert max_diff(swapped, want) > 4 * PIXEL_TOL, "te and unet weights swapped went unnoticed"


def test_switching_restores_base_exactly(lora_pipeline, base_image):
    """Base -> LoRA A -> LoRA B -> A -> base: each state's image is the same whatever came before, bit for bit."""
    a1, _ = sdrt_image(lora_pipeline, f"{PROMPT} <lora:style:1>")
    b1, _ = sdrt_image(lora_pipeline, f"{PROMPT} <lora:locon:1>")
    a2, _ = sdrt_image(lora_pipeline, f"{PROMPT} <lora:style>")
    back, _ = sdrt_image(lora_pipeline, PROMPT)
    assert max_diff(a1, a2) == 0 and max_diff(back, base_image) == 0
    assert max_diff(a1, b1) > 10 * PIXEL_TOL


def test_infotext_records_and_regenerates(tiny_sd, loras, lora_pipeline, tmp_path):
    """Lora hashes as A1111 writes them (sha256 of a .safetensors file's bytes after its header, 12 hex digits),
    read back by --from-png, which regenerates the same image; a renamed file is found by its hash."""
    from sdrt.cli import main
    from sdrt.runtime.infotext import parse_infotext

    _, image = sdrt_image(lora_pipeline, f"{PROMPT} <lora:style:0.8>")
    data = (loras[0] / "styles" / "style.safetensors").read_bytes()
    (header,) = struct.unpack("<Q", data[:8])
    want_hash = hashlib.sha256(data[8 + header :]).hexdigest()[:12]
    params = parse_infotext(image.info["parameters"])
    assert params["Lora hashes"] == f"style: {want_hash}"
    assert params["Prompt"] == f"{PROMPT} <lora:style:0.8>"
    png = tmp_path / "in.png"
    image.save(png, pnginfo=_pnginfo(image.info["parameters"]))
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "style_v2.safetensors").write_bytes(data)  # A1111's infotext_pasted: found by hash
    for folder in (loras[0], renamed):
        out = tmp_path / f"out-{folder.name}"
        assert main(["generate", "--from-png", str(png), "-m", str(tiny_sd[1]), "--lora-dir", str(folder),
                     "-o", str(out)]) == 0  # fmt: skip
        again = np.asarray(__import__("PIL.Image").Image.open(next(out.glob("*.png"))).convert("RGB"))
        assert max_diff(again, np.asarray(image)) == 0


def _pnginfo(text):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    return info


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (f"{PROMPT} <lora:for_sdxl:1>", "for_sdxl.safetensors targets text_encoder_2"),
        (f"{PROMPT} <lora:nothing:1>", "matches none of its layers"),
        (f"{PROMPT} <lora:wrong_shape:1>", "wrong_shape.safetensors targets unet"),
        (f"{PROMPT} <lora:missing:1>", "a LoRA in the LoRA folder"),
        (f"{PROMPT} <lora:style:heavy>", "finite numbers"),
    ],
    ids=["other-family", "no-layer", "other-shape", "unknown", "bad-weight"],
)
def test_refusals(lora_pipeline, prompt, message):
    with pytest.raises(InvalidOption, match=message):
        lora_pipeline.generate(prompt, steps=1, width=64, height=64, progress=False)


def test_pickle_code_refused(tiny_sd, tmp_path):
    """A .pt LoRA that would run code when unpickled is refused, and the code does not run."""
    import pickle

    from sdrt import Pipeline

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1), "boom": Boom()}, folder / "evil.pt")
    pipe = Pipeline.load(tiny_sd[1], loras=folder)
    with pytest.raises(InvalidOption, match="evil.pt"):
        pipe.loras.file("evil")
    assert pickle  # the file really is a pickle of a foreign global


def test_prompt_syntax_as_a1111():
    """A1111's extra_networks.parse_prompt + ExtraNetworkLora: tags removed, te then unet, named te=/unet=."""
    assert parse_prompt("a <lora:x> b") == ("a  b", [ActiveLora("x", 1.0, 1.0)])
    assert parse_prompt("<lora:x:0.5>") == ("", [ActiveLora("x", 0.5, 0.5)])
    assert parse_prompt("<lora:x:0.5:0.25>")[1] == [ActiveLora("x", 0.5, 0.25)]
    assert parse_prompt("<lora:x:unet=0.3:te=0.7>")[1] == [ActiveLora("x", 0.7, 0.3)]
    assert parse_prompt("<lyco:y:2>,<lora:x:1>")[1] == [ActiveLora("y", 2.0, 2.0), ActiveLora("x", 1.0, 1.0)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert parse_prompt("cat <hypernet:h:1>") == ("cat ", [])
    assert "hypernet" in str(caught[0].message)
    assert requested("cat", {"a": (0.5, 1)}) == ("cat<lora:a:0.5:1>", [ActiveLora("a", 0.5, 1.0)])
    with pytest.raises(InvalidOption, match="loras"):
        requested("cat", {"a:b": 1})


def test_listing_as_a1111(lora_pipeline):
    """GET /sdapi/v1/loras's entries: name, alias (ss_output_name), path relative to the folder, metadata."""
    entries = {e["name"]: e for e in lora_pipeline.loras.listing()}
    assert entries["style"] == {"name": "style", "alias": "my_style", "path": "styles/style.safetensors",
                                "metadata": {"ss_output_name": "my_style"}}  # fmt: skip
    assert entries["loha_pt"]["path"] == "loha_pt.pt"


def test_http_api(tiny_sd, loras, lora_pipeline, tmp_path):
    """`sdrt serve --lora-dir`: LoRAs in the prompt as in A1111's API, GET /sdapi/v1/loras without server paths,
    and a bad LoRA a 4xx naming the file relative to the folder."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    import base64
    import io

    from PIL import Image
    from server_fixture import running_server

    (loras[0] / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    try:
        with running_server(tiny_sd[1], tmp_path, "--lora-dir", str(loras[0])) as server:
            listed = server.get("/sdapi/v1/loras").json()
            assert {"name": "style", "alias": "my_style", "path": "styles/style.safetensors",
                    "metadata": {"ss_output_name": "my_style"}} in listed  # fmt: skip
            assert not any(str(loras[0]) in str(entry) for entry in listed)
            body = {"prompt": f"{PROMPT} <lora:style:0.8>", "seed": SEED, **RUN, "sampler_name": RUN["sampler"]}
            body.pop("sampler")
            res = server.post("/sdapi/v1/txt2img", json=body)
            assert res.status_code == 200, res.text
            image = np.asarray(Image.open(io.BytesIO(base64.b64decode(res.json()["images"][0]))).convert("RGB"))
            direct = sdrt_image(lora_pipeline, f"{PROMPT} <lora:style:0.8>", rng="gpu")[0]  # A1111's default RNG
            assert max_diff(image[None], direct) == 0
            bad = server.post("/sdapi/v1/txt2img", json={**body, "prompt": "<lora:broken:1>"})
            assert 400 <= bad.status_code < 500 and "broken.safetensors" in bad.text
            assert str(loras[0]) not in bad.text
    finally:
        (loras[0] / "broken.safetensors").unlink()


def test_low_vram_staging_keeps_loras(tiny_sd, loras, lora_pipeline):
    """With engines loaded one at a time, each load takes the LoRA weights set while it was unloaded."""
    from sdrt import Pipeline

    staged = Pipeline.load(tiny_sd[1], loras=loras[0], low_vram=True)
    for prompt in (f"{PROMPT} <lora:style:0.8>", f"{PROMPT} <lora:loha:1>", PROMPT):
        assert max_diff(sdrt_image(staged, prompt)[0], sdrt_image(lora_pipeline, prompt)[0]) == 0
