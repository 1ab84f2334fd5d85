"""A1111's "Approx NN" live preview: the VAE-approx file (random weights in A1111's layout) exported as the folder's
vae_approx graph, its previews against an independent torch implementation of the architecture written here from
A1111's modules/sd_vae_approx.py and sd_samplers_common.single_sample_to_image.

Tolerance: 1/255 (A1111 truncates to uint8, sdrt rounds).
"""

import pickle
import shutil

import numpy as np
import pytest

PIXEL_TOL = 1  # /255


def reference_network(latent_channels: int = 4):
    """A1111's VAEApprox: 2x nearest upsampling, 11 zeros of padding, eight convolutions each with leaky ReLU 0.1."""
    import torch
    from torch import nn

    class Reference(nn.Module):
        def __init__(self, last_activation: bool = True):
            super().__init__()
            self.last_activation = last_activation
            self.conv1 = nn.Conv2d(latent_channels, 8, (7, 7))
            self.conv2 = nn.Conv2d(8, 16, (5, 5))
            self.conv3 = nn.Conv2d(16, 32, (3, 3))
            self.conv4 = nn.Conv2d(32, 64, (3, 3))
            self.conv5 = nn.Conv2d(64, 32, (3, 3))
            self.conv6 = nn.Conv2d(32, 16, (3, 3))
            self.conv7 = nn.Conv2d(16, 8, (3, 3))
            self.conv8 = nn.Conv2d(8, 3, (3, 3))

        def forward(self, x):
            x = nn.functional.interpolate(x, (x.shape[2] * 2, x.shape[3] * 2))
            x = nn.functional.pad(x, (11, 11, 11, 11))
            layers = [self.conv1, self.conv2, self.conv3, self.conv4, self.conv5, self.conv6, self.conv7, self.conv8]
            for i, layer in enumerate(layers):
                x = layer(x)
                if i < 7 or self.last_activation:
                    x = nn.functional.leaky_relu(x, 0.1)
            return x

    torch.manual_seed(7)
    return Reference().eval()


def reference_image(network, latents: np.ndarray) -> np.ndarray:
    """A1111's single_sample_to_image: (x / 2 + 0.5) clamped, x 255, cast to uint8; (B, H, W, 3)."""
    import torch

    with torch.no_grad():
        x = network(torch.from_numpy(latents)) * 0.5 + 0.5
        x = 255.0 * torch.clamp(x, 0.0, 1.0).permute(0, 2, 3, 1)
    return x.to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def approx_file(tmp_path_factory):
    """(reference network, model.pt): random weights saved as A1111's file is (a state dict, torch.save)."""
    import torch

    network = reference_network()
    with torch.no_grad():
        for layer in network.children():
            layer.weight.mul_(2.5)  # images that spread over [0, 255] rather than a flat grey
    path = tmp_path_factory.mktemp("vae_approx") / "model.pt"
    torch.save(network.state_dict(), path)
    return network, path


@pytest.fixture(scope="module")
def approx_model(tiny_sd, approx_file, tmp_path_factory):
    """A copy of the tiny model's folder with Approx NN added through `sdrt export --vae-approx`."""
    from sdrt.cli import main

    folder = tmp_path_factory.mktemp("approx_model") / "model"
    shutil.copytree(tiny_sd[1], folder)
    assert main(["export", "unused-source", "-o", str(folder), "--vae-approx", str(approx_file[1])]) == 0
    return folder


def max_diff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_approx_nn_matches_a1111_network(approx_model, approx_file):
    from sdrt import Pipeline
    from sdrt.runtime.previews import preview_method

    network, _ = approx_file
    pipe = Pipeline.load(approx_model)
    assert preview_method(pipe.manifest, "Approx NN") == "Approx NN"
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 6)).astype(np.float32)
    got = np.stack([np.asarray(im) for im in pipe.preview(latents, "Approx NN")])
    want = reference_image(network, latents)
    assert got.shape == want.shape == (2, 16, 12, 3)  # twice the latent size
    assert max_diff(got, want) <= PIXEL_TOL
    assert got.std() > 20  # an image, not a flat field
    # can-fail twins: the latent channels in the wrong order, and the last activation left out, are far off
    assert max_diff(got, reference_image(network, np.ascontiguousarray(latents[:, ::-1]))) > 20
    network.last_activation = False
    try:
        assert max_diff(got, reference_image(network, latents)) > 20
    finally:
        network.last_activation = True


def test_approx_nn_as_live_preview(approx_model):
    """A generation's progress callback previews each step's x0 with Approx NN."""
    from sdrt import Pipeline

    pipe = Pipeline.load(approx_model)
    sizes = []
    pipe.generate("a photo of a grey squirrel", steps=2, width=64, height=64, seed=1, progress=False,
                  callback=lambda step, total, x0: sizes.append(pipe.preview(x0, "Approx NN")[0].size))  # fmt: skip
    assert sizes == [(16, 16), (16, 16)]


def test_without_the_file_approx_nn_falls_back(tiny_pipeline):
    """A folder without the graph: Approx NN is served by TAESD when the folder has it, else Approx cheap."""
    from sdrt.runtime.previews import preview_method

    assert preview_method(tiny_pipeline.manifest, "Approx NN") == "Approx cheap"
    latents = np.zeros((1, 4, 8, 8), np.float32)
    assert tiny_pipeline.preview(latents, "Approx NN")[0].size == (8, 8)


def test_refused_files(tmp_path, tiny_sd):
    import torch

    from sdrt.errors import InvalidOption, ModelError
    from sdrt.export.vae_approx import load_vae_approx, vae_approx_step

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps({"conv1.weight": Payload()}))
    with pytest.raises(ModelError, match="refusing"):
        load_vae_approx(str(evil))
    with pytest.raises(InvalidOption, match="--vae-approx"):
        load_vae_approx(str(tmp_path / "missing.pt"))
    torch.save({"conv1.weight": torch.zeros(8, 4, 7, 7)}, tmp_path / "partial.pt")
    with pytest.raises(ModelError, match="does not fit A1111's VAEApprox"):
        load_vae_approx(str(tmp_path / "partial.pt"))
    torch.save({"weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="not an Approx NN file"):
        load_vae_approx(str(tmp_path / "other.pt"))
    wide = reference_network(16)  # vaeapprox-sd3.pt's layout: 16 latent channels
    torch.save(wide.state_dict(), tmp_path / "vaeapprox-sd3.pt")
    with pytest.raises(InvalidOption, match="16-channel latents"):
        vae_approx_step(load_vae_approx(str(tmp_path / "vaeapprox-sd3.pt")), 4)


def test_cli_refuses_a_bad_file(tiny_sd, tmp_path, capsys):
    from sdrt.cli import main

    folder = tmp_path / "model"
    shutil.copytree(tiny_sd[1], folder)
    assert main(["export", "unused-source", "-o", str(folder), "--vae-approx", str(tmp_path / "nope.txt")]) == 2
    assert "--vae-approx" in capsys.readouterr().err
    assert "vae_approx" not in (folder / "model.json").read_text()


def test_approx_nn_low_vram(approx_model, approx_file):
    """Staged engines (low VRAM): the Approx NN graph runs as the others do."""
    from sdrt import Pipeline

    staged = Pipeline.load(approx_model, low_vram=True)
    latents = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    got = np.asarray(staged.preview(latents, "Approx NN")[0])[None]
    assert max_diff(got, reference_image(approx_file[0], latents)) <= PIXEL_TOL
