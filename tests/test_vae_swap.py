"""Another VAE in place of the model's (A1111's sd_vae; the option vae_file; export/vae_files.py, runtime/vae_swap.py):
a diffusers VAE folder and the same weights as LDM .safetensors and .pt files export to the same graphs; an image
decoded by the swapped VAE is diffusers' pipeline's with that VAE (2/255), the encoder too; the infotext names it
as A1111 does; a pickle with code, a VAE of another family and a folder that is no VAE are refused by name."""

import hashlib
import json
import pickle

import numpy as np
import pytest
from diffusers_reference import diffusers_run
from tiny_vae_files import ldm_vae_weights, tiny_swap_vae, write_vae_files

from sdrt.errors import InvalidOption, ModelError

PIXEL_TOL = 2  # /255, as tests/test_parity.py
RUN = dict(width=64, height=64, steps=8, cfg_scale=7.0, sampler="Euler")


@pytest.fixture(scope="module")
def vae_env(tiny_sd, tmp_path_factory):
    """(the swap VAE in torch, {kind: source path}, {kind: exported VAE folder}); the cache in a temporary folder."""
    from sdrt.export.vae_files import export_vae

    root = tmp_path_factory.mktemp("vaes")
    patch = pytest.MonkeyPatch()
    patch.setenv("SDRT_CACHE", str(root / "cache"))
    vae = tiny_swap_vae(5, tiny_sd[0].vae.config.scaling_factor)
    files = write_vae_files(vae, root / "VAE")
    exported = {kind: export_vae(str(path), tiny_sd[1], progress=False) for kind, path in files.items()}
    yield vae, files, exported
    patch.undo()


def sdrt_image(pipeline, seed, **kw) -> np.ndarray:
    return np.asarray(pipeline.generate("a cat", seed=seed, progress=False, **RUN, **kw)[0])


def max_diff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_ldm_weights_helper_is_diffusers_conversion_inverse(vae_env):
    """The test's LDM files are right: diffusers' own converter maps them back onto the VAE's state dict."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = vae_env[0]
    back = convert_ldm_vae_checkpoint(ldm_vae_weights(vae), dict(vae.config))
    own = vae.state_dict()
    assert set(back) == set(own)
    assert all(np.array_equal(back[k].reshape(own[k].shape).numpy(), own[k].numpy()) for k in own)


def test_swapped_vae_image_matches_diffusers_with_that_vae(vae_env, tiny_sd, tiny_pipeline):
    """txt2img decoded by the swapped VAE (folder and LDM file) equals StableDiffusionPipeline(vae=that VAE) within
    2/255; the twin: the model's own VAE is far from it (and matches diffusers' own pipeline)."""
    from diffusers import StableDiffusionPipeline

    vae, _, exported = vae_env
    swapped = StableDiffusionPipeline(**{**tiny_sd[0].components, "vae": vae})
    swapped.set_progress_bar_config(disable=True)
    want = diffusers_run(swapped, "a cat", seeds=(3,), **RUN)[0]
    for kind in ("diffusers", "safetensors"):
        got = sdrt_image(tiny_pipeline, 3, vae_file=str(exported[kind]))
        assert max_diff(got, want) <= PIXEL_TOL, kind
    own = sdrt_image(tiny_pipeline, 3)
    assert max_diff(own, want) > 20  # the can-fail twin: another VAE's image
    assert max_diff(own, diffusers_run(tiny_sd[0], "a cat", seeds=(3,), **RUN)[0]) <= PIXEL_TOL


def test_every_source_exports_the_same_vae(vae_env, tiny_pipeline):
    """The diffusers folder, the LDM .safetensors and the LDM .pt (weights-only unpickler) decode and encode alike,
    and the encoder is torch's (posterior mean, scaled by the model's factor)."""
    import torch

    vae, _, exported = vae_env
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    decoded = {kind: tiny_pipeline.vae.using(str(folder)).decode(latents) for kind, folder in exported.items()}
    for kind in ("safetensors", "pt"):
        np.testing.assert_allclose(decoded[kind], decoded["diffusers"], atol=1e-5, err_msg=kind)
    image = np.random.default_rng(1).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    swapped = tiny_pipeline.vae.using(str(exported["pt"]))
    got = swapped.encode(image, lambda: np.zeros((1, 4, 8, 8), np.float32))
    with torch.no_grad():
        want = vae.encode(torch.from_numpy(image)).latent_dist.mean.numpy() * tiny_pipeline.manifest.vae_scaling_factor
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    own = tiny_pipeline.vae.encode(image, lambda: np.zeros((1, 4, 8, 8), np.float32))
    assert np.abs(own - want).max() > 1e-2  # the twin: the model's own encoder


def test_img2img_encodes_with_the_swapped_vae(vae_env, tiny_pipeline):
    from PIL import Image

    exported = vae_env[2]
    init = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    kw = dict(init_image=init, strength=0.5)
    swapped = sdrt_image(tiny_pipeline, 4, vae_file=str(exported["diffusers"]), **kw)
    again = sdrt_image(tiny_pipeline, 4, vae_file=str(exported["safetensors"]), **kw)
    assert max_diff(swapped, again) <= 1 and max_diff(swapped, sdrt_image(tiny_pipeline, 4, **kw)) > 20


def test_infotext_names_the_vae_as_a1111(vae_env, tiny_pipeline):
    """A1111's "VAE hash" (the file's sha256, 10 digits) and "VAE" (its file name), right after "Model"."""
    from sdrt.runtime.infotext import parse_infotext

    _, files, exported = vae_env
    image = tiny_pipeline.generate("a cat", seed=1, progress=False, **RUN, vae_file=str(exported["safetensors"]))[0]
    text = image.info["parameters"]
    sha = hashlib.sha256(files["safetensors"].read_bytes()).hexdigest()
    assert f"Model: {tiny_pipeline.manifest.model_name}, VAE hash: {sha[:10]}, VAE: swap.safetensors," in text
    assert parse_infotext(text)["VAE"] == "swap.safetensors"
    plain = tiny_pipeline.generate("a cat", seed=1, progress=False, **RUN)[0].info["parameters"]
    assert "VAE" not in plain.replace("VAE Decoder", "")


class Payload:  # a pickle that would run code when loaded
    def __reduce__(self):
        return (print, ("code ran",))


def test_bad_vae_files_refused(tiny_sd, tiny_pipeline, vae_env, tmp_path, monkeypatch, capsys):
    """A pickle holding code (nothing runs), another family's VAE (latent channels; a folder's scaling factor), a
    file that is no VAE, a vae_file that is no exported VAE: one error each, naming the field and what is allowed."""
    from safetensors.torch import save_file

    from sdrt.export.vae_files import export_vae

    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "cache"))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"encoder.conv_in.weight": Payload()}))
    with pytest.raises(ModelError, match="refusing"):
        export_vae(str(evil), tiny_sd[1], progress=False)
    assert "code ran" not in capsys.readouterr().out
    wide = tiny_swap_vae(6, 0.18215, latent_channels=16)
    save_file(ldm_vae_weights(wide), str(tmp_path / "flux-like.safetensors"))
    with pytest.raises(InvalidOption, match="4 latent channels .* this one has 16: a VAE of another model family"):
        export_vae(str(tmp_path / "flux-like.safetensors"), tiny_sd[1], field="sd_vae", progress=False)
    tiny_swap_vae(7, 0.13025).save_pretrained(tmp_path / "sdxl-like")
    with pytest.raises(InvalidOption, match="scaling factor"):
        export_vae(str(tmp_path / "sdxl-like"), tiny_sd[1], progress=False)
    save_file({"x": __import__("torch").zeros(2)}, str(tmp_path / "notvae.safetensors"))
    with pytest.raises(ModelError, match="is not a VAE"):
        export_vae(str(tmp_path / "notvae.safetensors"), tiny_sd[1], progress=False)
    with pytest.raises(InvalidOption, match="--vae: got 'nope.txt'"):
        export_vae("nope.txt", tiny_sd[1], progress=False)
    with pytest.raises(InvalidOption, match="vae_file: got .*an exported VAE folder"):
        tiny_pipeline.generate("a cat", vae_file=str(tmp_path), progress=False, **RUN)
    assert not list((tmp_path / "cache").rglob("vae.json"))  # nothing refused was published
    assert json.loads((vae_env[2]["pt"] / "vae.json").read_text())["name"] == "swap.vae.pt"


def test_cli_generate_with_a_vae_file(vae_env, tiny_sd, tiny_pipeline, tmp_path, capsys):
    """`sdrt generate --vae FILE_OR_FOLDER` exports the VAE (once; the module's cache) and runs with it: the Python
    API's image with vae_file; --vae full and taesd keep their meaning; a file that is no VAE exits 2 naming --vae."""
    from PIL import Image

    from sdrt.cli import main

    _, files, exported = vae_env
    base = ["generate", "a cat", "-m", str(tiny_sd[1]), "--seed", "3", "--steps", "8", "--width", "64", "--height",
            "64", "--sampler", "Euler"]  # fmt: skip
    assert main([*base, "--vae", str(files["pt"]), "-o", str(tmp_path / "out")]) == 0
    (written,) = sorted((tmp_path / "out").glob("*.png"))
    got = np.asarray(Image.open(written).convert("RGB"))
    assert max_diff(got, sdrt_image(tiny_pipeline, 3, vae_file=str(exported["pt"]))) == 0
    assert "VAE: swap.vae.pt" in Image.open(written).info["parameters"]
    assert main([*base, "--vae", "full", "-o", str(tmp_path / "own")]) == 0
    (own,) = sorted((tmp_path / "own").glob("*.png"))
    assert max_diff(np.asarray(Image.open(own).convert("RGB")), got) > 20
    capsys.readouterr()
    assert main([*base, "--vae", str(tmp_path / "out"), "-o", str(tmp_path / "bad")]) == 2
    assert "--vae: got" in capsys.readouterr().err


def test_hires_image_upscaler_round_trip_uses_the_swapped_vae(vae_env, tiny_pipeline, monkeypatch):
    """Hires fix with an image upscaler decodes the first pass and encodes the upscaled image with the swapped VAE
    (A1111 has one VAE loaded for everything); its infotext names that VAE."""
    from sdrt.runtime.vae import Vae

    folder = str(vae_env[2]["diffusers"])
    swapped = tiny_pipeline.vae.using(folder)
    calls = []
    for name in ("encode", "decode"):
        original = getattr(Vae, name)
        monkeypatch.setattr(Vae, name, lambda self, *a, _f=original, _n=name: calls.append((_n, self)) or _f(self, *a))
    image = tiny_pipeline.generate("a cat", seed=2, progress=False, **RUN, hires=True, hires_scale=1.5,
                                   hires_upscaler="Lanczos", hires_steps=2, vae_file=folder)[0]  # fmt: skip
    assert [(n, v is swapped) for n, v in calls] == [("decode", True), ("encode", True), ("decode", True)]
    assert "VAE: swap-diffusers" in image.info["parameters"] and image.size == (96, 96)
