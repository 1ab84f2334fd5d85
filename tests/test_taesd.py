"""TAESD export (diffusers AutoencoderTiny folders and madebyollin's decoder files), `vae="taesd"` as the final
decoder against diffusers' AutoencoderTiny, A1111's preview methods, and lazy live previews in the server's worker.

Tolerance: images within 2/255 of diffusers' AutoencoderTiny.decode on the same latents (as test_parity.py).
"""

import asyncio
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

PIXEL_TOL = 2  # /255
PROMPT = "a photo of a grey squirrel"


def raw_decoder_weights(tiny) -> dict:
    """madebyollin's taesd_decoder layout: diffusers' decoder.layers.{i} is the original Sequential's index i + 1."""
    out = {}
    for key, value in tiny.decoder.layers.state_dict().items():
        index, _, rest = key.partition(".")
        out[f"{int(index) + 1}.{rest}"] = value.clone()
    return out


@pytest.fixture(scope="module")
def taesd_sources(tmp_path_factory):
    """A random full-size TAESD (AutoencoderTiny's default config) as a diffusers folder and the two decoder files.

    Its last convolution is scaled so images spread over [0, 255] (a random one gives near-black images)."""
    import torch
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("taesd")
    torch.manual_seed(4)
    tiny = AutoencoderTiny().eval()
    with torch.no_grad():
        tiny.decoder.layers[-1].weight.mul_(20)
        tiny.decoder.layers[-1].bias.fill_(0.5)
    tiny.save_pretrained(root / "taesd-diffusers")
    raw = raw_decoder_weights(tiny)
    save_file(raw, str(root / "taesd_decoder.safetensors"))
    torch.save(raw, root / "taesd_decoder.pth")
    return tiny, root


@pytest.fixture(scope="module")
def taesd_model(tiny_sd, taesd_sources, tmp_path_factory):
    """A copy of the tiny model's folder with TAESD added from the .pth decoder file (through `sdrt export --taesd`)."""
    from sdrt.cli import main

    folder = tmp_path_factory.mktemp("taesd_model") / "model"
    shutil.copytree(tiny_sd[1], folder)
    source = str(taesd_sources[1] / "taesd_decoder.pth")
    assert main(["export", "unused-source", "-o", str(folder), "--taesd", source]) == 0
    return folder


def torch_decode(tiny, latents: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        images = tiny.decode(torch.from_numpy(latents)).sample.numpy()
    return (np.clip(images / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def max_diff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_vae_taesd_matches_diffusers_autoencoder_tiny(taesd_model, taesd_sources):
    from sdrt import Pipeline

    tiny, _ = taesd_sources
    pipe = Pipeline.load(taesd_model)
    kw = dict(steps=4, width=64, height=64, seed=5, progress=False)
    latents = pipe.generate(PROMPT, output_type="latent", **kw)
    images = pipe.generate(PROMPT, vae="taesd", **kw)
    got = np.stack([np.asarray(im) for im in images])
    want = torch_decode(tiny, latents)
    assert got.shape == want.shape == (1, 64, 64, 3)
    assert max_diff(got, want) <= PIXEL_TOL
    assert 50 < got.mean() < 200 and got.std() > 20  # an image, not a flat field
    # can-fail twin: the latent channels in the wrong order are far off
    assert max_diff(got, torch_decode(tiny, np.ascontiguousarray(latents[:, ::-1]))) > 20
    assert "VAE Decoder: TAESD" in images[0].info["parameters"]
    full = pipe.generate(PROMPT, **kw)[0]
    assert "VAE Decoder" not in full.info["parameters"]


@pytest.mark.parametrize("name", ["taesd-diffusers", "taesd_decoder.safetensors"])
def test_sources_give_the_same_graph(taesd_sources, name):
    from sdrt.export.taesd import load_taesd

    tiny, root = taesd_sources
    loaded = load_taesd(str(root / name))
    latents = np.random.default_rng(1).standard_normal((1, 4, 6, 5)).astype(np.float32)
    assert max_diff(torch_decode(loaded, latents), torch_decode(tiny, latents)) == 0


def test_refused_sources(tmp_path, tiny_sd):
    from sdrt.errors import InvalidOption, ModelError
    from sdrt.export.taesd import load_taesd

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "taesd_decoder.pth"
    evil.write_bytes(pickle.dumps({"1.weight": Payload()}))
    with pytest.raises(ModelError, match="refusing"):
        load_taesd(str(evil))
    with pytest.raises(InvalidOption, match="--taesd"):
        load_taesd(str(tmp_path))  # a folder without config.json
    from safetensors.numpy import save_file

    save_file({"model.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match="not a TAESD decoder"):
        load_taesd(str(tmp_path / "other.safetensors"))


def test_vae_taesd_needs_the_graph(tiny_pipeline):
    from sdrt.errors import InvalidOption

    with pytest.raises(InvalidOption, match="vae: got 'taesd'"):
        tiny_pipeline.generate(PROMPT, steps=1, vae="taesd", progress=False)


def test_preview_methods(taesd_model, tiny_pipeline):
    from sdrt import Pipeline

    pipe = Pipeline.load(taesd_model)
    latents = np.zeros((1, 4, 8, 8), np.float32)
    latents[0, 0] = 1.0  # A1111's Approx cheap: latent channel 0 maps to RGB (0.298, 0.207, 0.208)
    cheap = np.asarray(pipe.preview(latents, "Approx cheap")[0]).astype(np.float32)
    want = (np.array([0.298, 0.207, 0.208]) / 2 + 0.5) * 255
    assert cheap.shape == (8, 8, 3) and np.abs(cheap - want).max() <= 1
    # twin: the coefficients read column-wise (channel 0 -> 0.298, 0.187, -0.158) would be far off
    assert np.abs(cheap - (np.array([0.298, 0.187, -0.158]) / 2 + 0.5) * 255).max() > 20
    taesd = np.asarray(pipe.preview(latents, "TAESD")[0])
    assert taesd.shape == (64, 64, 3)
    assert max_diff(np.asarray(pipe.preview(latents, "Approx NN")[0]), taesd) == 0  # Approx NN: TAESD here
    full = np.asarray(pipe.preview(latents, "Full")[0])
    from sdrt.runtime.image import to_pil

    assert max_diff(full, np.asarray(to_pil(pipe.decode(latents))[0])) == 0 and max_diff(full, taesd) > 20
    # without a TAESD graph, TAESD and Approx NN previews fall back to Approx cheap
    assert np.asarray(tiny_pipeline.preview(latents, "TAESD")[0]).shape == (8, 8, 3)


def test_preview_content_prompt_half(tiny_pipeline):
    """live_preview_content "Prompt": the callback's x0 is the conditional half's, not the guided one."""
    seen = {}

    def callback(content):
        return lambda step, total, x0: seen.setdefault(content, x0.copy())

    for content in ("Combined", "Prompt", "Negative prompt"):
        tiny_pipeline.generate(PROMPT, negative_prompt="blue sky", steps=2, cfg_scale=7, width=64, height=64, seed=2,
                               live_preview_content=content, callback=callback(content), progress=False)  # fmt: skip
    combined, cond, uncond = seen["Combined"], seen["Prompt"], seen["Negative prompt"]
    # guidance is linear in x0: combined = uncond + 7 (cond - uncond)
    np.testing.assert_allclose(combined, uncond + 7 * (cond - uncond), rtol=1e-4, atol=1e-3)
    assert np.abs(cond - combined).max() > 0.1 and np.abs(uncond - cond).max() > 0.01


class FakePipe:
    """Stands in for the Pipeline in the server's worker: STEPS steps, polling /progress after the steps in POLLS."""

    manifest = SimpleNamespace(model_name="fake", source={}, folder=Path("fake"))  # what the model registry lists

    def __init__(self, backend_box, steps: int, polls: set):
        self.box, self.steps, self.polls, self.decoded = backend_box, steps, polls, []

    def generate(self, callback=None, **_):
        for step in range(1, self.steps + 1):
            callback(step, self.steps, np.full((1, 4, 8, 8), step, np.float32))
            if step in self.polls:
                asyncio.run(self.box[0].progress(skip_current_image=False))
            if step + 100 in self.polls:
                asyncio.run(self.box[0].progress(skip_current_image=True))
        return []

    def preview(self, latents, method):
        from PIL import Image

        self.decoded.append((int(latents[0, 0, 0, 0]), method))
        return [Image.new("RGB", (8, 8))]


@pytest.mark.parametrize(
    ("polls", "every", "want"),
    [(set(), 1, []), ({101, 102, 103}, 1, []), ({2, 3, 4, 9}, 1, [3, 4, 5, 10]), ({1, 2, 3, 4, 5, 6}, 3, [2, 5, 8])],
    ids=["no-poller", "skip-image-polls", "every-step", "every-3"],
)
def test_previews_decoded_only_when_polled(polls, every, want):
    from sdrt.server.generation import Generation, LocalBackend

    box = []
    pipe = FakePipe(box, 10, polls)
    backend = LocalBackend(pipe, max_queue=2)
    box.append(backend)
    try:
        generation = Generation("txt2img", {}, 1, preview_every=every, preview_method="TAESD")
        asyncio.run(_run(backend, generation))
    finally:
        backend.stop()
    assert [step for step, _ in pipe.decoded] == want
    assert all(method == "TAESD" for _, method in pipe.decoded)


async def _run(backend, generation):
    return await backend.submit(generation)


def test_cli_vae_taesd(taesd_model, tmp_path):
    from PIL import Image

    from sdrt.cli import main

    args = ["generate", PROMPT, "-m", str(taesd_model), "--steps", "2", "--vae", "taesd", "-o", str(tmp_path)]
    assert main(args) == 0
    assert "VAE Decoder: TAESD" in Image.open(next(tmp_path.glob("*.png"))).info["parameters"]


def test_taesd_low_vram(taesd_model):
    """Staged engines (low VRAM): TAESD as the final decoder and as a preview."""
    from sdrt import Pipeline

    staged = Pipeline.load(taesd_model, low_vram=True)
    seen = []

    def callback(step, total, x0):
        seen.append(staged.preview(x0, "TAESD")[0].size)

    images = staged.generate(PROMPT, steps=2, width=64, height=64, seed=1, vae="taesd", progress=False,
                             callback=callback)  # fmt: skip
    assert images[0].size == (64, 64) and seen == [(64, 64), (64, 64)]


def test_a1111_infotext_and_settings():
    """A request's `infotext` with "VAE Decoder: TAESD" becomes A1111's setting sd_vae_decode_method "TAESD"."""
    from sdrt.server import a1111

    req = a1111.Txt2ImgRequest(prompt="x", infotext="a cat\nSteps: 4, Sampler: Euler, VAE Decoder: TAESD")
    a1111.apply_infotext(req, a1111.DEFAULT_OPTIONS)
    assert req.override_settings == {"sd_vae_decode_method": "TAESD"}
    kwargs = a1111.generate_kwargs(req, a1111.settings(req, a1111.DEFAULT_OPTIONS, ("m",)))
    assert kwargs["vae"] == "taesd" and kwargs["live_preview_content"] == "Prompt"
