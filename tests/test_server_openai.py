"""The OpenAI-style images API (/v1/images/generations, /v1/images/edits) driven by the official `openai` client:
the same images as A1111's routes for the same request, OpenAI's error shape naming the field, the same auth."""

import base64
import io

import numpy as np
import pytest
from PIL import Image
from server_fixture import SMALL, decode_b64, gradient, png_b64, running_server

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

STEPS = {"steps": SMALL["steps"]}


def client(server, api_key="unused"):
    return openai.OpenAI(api_key=api_key, base_url=server.url + "/v1", max_retries=0, timeout=60)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def from_b64(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def a1111_images(server, path, **fields) -> list:
    res = server.post(path, fields)
    assert res.status_code == 200, res.text
    return [decode_b64(b) for b in res.json()["images"]]


def test_generate_matches_txt2img(sdrt_server):
    """n images of `size`, each the one /sdapi/v1/txt2img makes for the same seed (extra_body carries A1111's
    fields); another seed differs, so the check can fail."""
    result = client(sdrt_server).images.generate(prompt="a cat", n=2, size="64x64", response_format="b64_json",
                                                 extra_body={**STEPS, "seed": 5})  # fmt: skip
    images = [from_b64(item.b64_json) for item in result.data]
    assert len(images) == 2 and images[0].size == (64, 64) and result.created > 0
    want = a1111_images(sdrt_server, "/sdapi/v1/txt2img", prompt="a cat", batch_size=2, seed=5, **SMALL)
    for got, expected in zip(images, want, strict=True):
        assert np.array_equal(pixels(got), pixels(expected))
    other = a1111_images(sdrt_server, "/sdapi/v1/txt2img", prompt="a cat", seed=6, **SMALL)[0]
    assert np.abs(pixels(images[0]) - pixels(other)).max() > 5


def test_generate_model_title_url_and_native_size(sdrt_server):
    title = sdrt_server.get("/sdapi/v1/sd-models").json()[0]["title"]
    result = client(sdrt_server).images.generate(prompt="a dog", model=title, response_format="url",
                                                 extra_body={**STEPS, "seed": 1})  # fmt: skip
    url = result.data[0].url
    assert url.startswith("data:image/png;base64,")
    assert from_b64(url.partition(",")[2]).size == (64, 64)  # size omitted: the tiny model's native 64


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"model": "dall-e-3"}, "model"),
        ({"size": "big"}, "size"),
        ({"n": 11}, "n"),
        ({"response_format": "gif"}, "response_format"),
        ({"size": "64x64", "extra_body": {"steps": 10_000}}, "steps"),
    ],
)
def test_generate_errors_are_openais(sdrt_server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client(sdrt_server).images.generate(prompt="a cat", **kwargs)
    error = info.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]


def test_edit_with_a_mask_is_inpainting(sdrt_server):
    """OpenAI's mask (transparent = edit) gives /sdapi/v1/img2img's inpainting with the mask's white there,
    bit for bit; without a mask (an opaque image) it is img2img, another image."""
    image = gradient(64, 64)
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # the area to edit
    buffers = {}
    for name, im in (("image", image), ("mask", mask)):
        buffers[name] = io.BytesIO()
        im.save(buffers[name], format="PNG")
        buffers[name].seek(0)
    extra = {**STEPS, "seed": 4}
    result = client(sdrt_server).images.edit(image=("image.png", buffers["image"], "image/png"), prompt="a hat",
                                             mask=("mask.png", buffers["mask"], "image/png"), size="64x64",
                                             response_format="b64_json", extra_body=extra)  # fmt: skip
    got = from_b64(result.data[0].b64_json)
    a1111_mask = Image.new("L", (64, 64), 0)
    a1111_mask.paste(255, (16, 16, 48, 48))
    want = a1111_images(sdrt_server, "/sdapi/v1/img2img", prompt="a hat", init_images=[png_b64(image)],
                        mask=png_b64(a1111_mask), denoising_strength=1.0, inpainting_fill=1, seed=4,
                        **SMALL)[0]  # fmt: skip
    assert np.array_equal(pixels(got), pixels(want))
    buffers["image"].seek(0)
    plain = client(sdrt_server).images.edit(image=("image.png", buffers["image"], "image/png"), prompt="a hat",
                                            response_format="b64_json", extra_body=extra)  # fmt: skip
    assert np.abs(pixels(from_b64(plain.data[0].b64_json)) - pixels(got)).max() > 5


def test_edit_errors(sdrt_server):
    with pytest.raises(openai.BadRequestError) as info:
        client(sdrt_server).images.edit(image=("x.png", io.BytesIO(b"not a png"), "image/png"), prompt="a")
    assert info.value.body["param"] == "image"


def test_api_key_is_the_basic_auth_pair(tiny_sd, tmp_path):
    with running_server(tiny_sd[1], tmp_path, "--api-auth", "alice:s3cret") as server:
        kwargs = dict(prompt="a cat", size="64x64", extra_body=STEPS)
        assert client(server, "alice:s3cret").images.generate(**kwargs).data[0].b64_json
        with pytest.raises(openai.AuthenticationError):
            client(server, "alice:wrong").images.generate(**kwargs)
