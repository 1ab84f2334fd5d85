"""TAESD3 (SD 3.5) and TAEF1 (FLUX.1): a tiny random 16-channel AutoencoderTiny exported with `sdrt export --taesd`,
as the final decoder (`vae="taesd"`) against diffusers' own pipelines holding that AutoencoderTiny as their VAE, and
as live previews; Approx cheap previews with these families' 16-channel coefficients.

Tolerance: images within 2/255 of diffusers' (as test_sd3.py / test_flux.py), each with a can-fail twin past 8/255.
"""

import shutil

import numpy as np
import pytest
from flow_helpers import diffusers_run, exported, max_diff_255, sdrt_run
from tiny_flux import build_tiny_flux
from tiny_sd3 import build_tiny_sd3

PROMPT = "a photo of a red cat"


def tiny_autoencoder(root, scaling_factor: float = 1.0, shift_factor: float = 0.0):
    """A small random AutoencoderTiny for 16-channel latents (8 pixels per cell), saved to ROOT; its last convolution
    scaled so that images spread over [0, 255]."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(11)
    tiny = AutoencoderTiny(latent_channels=16, encoder_block_out_channels=(8, 8, 8, 8),
                           decoder_block_out_channels=(16, 16, 16, 16), num_encoder_blocks=(1, 1, 1, 1),
                           num_decoder_blocks=(1, 1, 1, 1), scaling_factor=scaling_factor,
                           shift_factor=shift_factor).eval()  # fmt: skip
    with torch.no_grad():
        tiny.decoder.layers[-1].weight.mul_(6)
    tiny.save_pretrained(root)
    return tiny


def with_taesd(pipeline, taesd_dir, root):
    """A copy of PIPELINE's folder with the AutoencoderTiny at TAESD_DIR added by `sdrt export --taesd`, loaded."""
    from sdrt import Pipeline
    from sdrt.cli import main

    folder = root / "model"
    shutil.copytree(pipeline.manifest.folder, folder)
    assert main(["export", "unused-source", "-o", str(folder), "--taesd", str(taesd_dir)]) == 0
    return Pipeline.load(folder)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(diffusers SD 3.5 pipeline whose VAE is a TAESD3-like AutoencoderTiny, sdrt Pipeline with it exported)."""
    root = tmp_path_factory.mktemp("taesd3")
    pipe, pipeline = exported(root, build_tiny_sd3, with_t5=False)
    tiny = tiny_autoencoder(root / "taesd3")  # as madebyollin/taesd3: scaling 1, shift 0
    return type(pipe)(**{**pipe.components, "vae": tiny}), with_taesd(pipeline, root / "taesd3", root)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(diffusers FLUX.1 dev pipeline whose VAE is an AutoencoderTiny with its own scaling and shift, sdrt Pipeline
    with it exported)."""
    root = tmp_path_factory.mktemp("taef1")
    pipe, pipeline = exported(root, build_tiny_flux, variant="dev")
    tiny = tiny_autoencoder(root / "taef1", scaling_factor=0.8, shift_factor=0.25)
    return type(pipe)(**{**pipe.components, "vae": tiny}), with_taesd(pipeline, root / "taef1", root)


def test_taesd3_final_decoder_matches_diffusers(sd3):
    pipe, pipeline = sd3
    reference = diffusers_run(pipe, PROMPT, [3], guidance_scale=7.0)
    ours = sdrt_run(pipeline, PROMPT, [3], cfg_scale=7.0, vae="taesd")
    assert max_diff_255(ours, reference) <= 2.0
    assert ours.std() > 0.05  # an image, not a flat field
    # can-fail twin: the decoder fed the VAE's raw latents (unscaled, unshifted) instead of the transformer's
    latents = sdrt_run(pipeline, PROMPT, [3], cfg_scale=7.0, output_type="latent")
    raw = latents / pipeline.manifest.vae_scaling_factor + pipeline.manifest.vae_shift_factor
    assert max_diff_255(images(pipeline.decode(raw.astype(np.float32), "taesd")), reference) > 8.0
    assert "VAE Decoder: TAESD" in pipeline.generate(PROMPT, steps=1, width=64, height=64, vae="taesd",
                                                      progress=False)[0].info["parameters"]  # fmt: skip


def test_taef1_final_decoder_matches_diffusers(flux, tmp_path):
    """An AutoencoderTiny whose config scales and shifts: diffusers' FLUX pipeline divides and shifts the latents
    by it before decoding, and so does the exported graph."""
    pipe, pipeline = flux
    reference = diffusers_run(pipe, PROMPT, [2], guidance_scale=3.5)
    ours = sdrt_run(pipeline, PROMPT, [2], distilled_cfg_scale=3.5, vae="taesd")
    assert max_diff_255(ours, reference) <= 2.0
    # can-fail twin: the same decoder without its config's scaling and shift
    tiny_autoencoder(tmp_path / "plain")  # the same weights, scaling 1 and shift 0
    twin = with_taesd(pipeline, tmp_path / "plain", tmp_path)
    assert max_diff_255(sdrt_run(twin, PROMPT, [2], distilled_cfg_scale=3.5, vae="taesd"), reference) > 8.0


def test_flow_previews(flux, sd3):
    """TAESD previews of each step's x0 at the image size; Approx cheap with the family's 16-channel coefficients."""
    for _, pipeline in (flux, sd3):
        sizes = []

        def callback(step, total, x0, p=pipeline, seen=sizes):
            seen.append(p.preview(x0, "TAESD")[0].size)

        pipeline.generate(PROMPT, steps=2, width=64, height=64, seed=1, cfg_scale=3.5, callback=callback,
                          progress=False)  # fmt: skip
        assert sizes == [(64, 64), (64, 64)]
        latents = np.zeros((1, 16, 8, 8), np.float32)
        latents[0, 0] = 1.0
        cheap = np.asarray(pipeline.preview(latents, "Approx cheap")[0]).astype(np.float32)
        want = (pipeline.family.preview_rgb[0] / 2 + 0.5) * 255
        assert cheap.shape == (8, 8, 3) and np.abs(cheap - want).max() <= 1
        assert np.asarray(pipeline.preview(latents, "Approx NN")[0]).shape == (64, 64, 3)  # served by TAESD here
    assert not np.array_equal(flux[1].family.preview_rgb, sd3[1].family.preview_rgb)
    # SD 3.5's first latent channel, as ComfyUI's and Forge's latent format has it: R -0.0922, G -0.0175, B 0.0749
    np.testing.assert_allclose(sd3[1].family.preview_rgb[0], [-0.0922, -0.0175, 0.0749])


def test_a_4_channel_taesd_is_refused(sd3, tmp_path):
    import torch
    from diffusers import AutoencoderTiny

    from sdrt.cli import main

    torch.manual_seed(0)
    AutoencoderTiny(decoder_block_out_channels=(8, 8, 8, 8), encoder_block_out_channels=(8, 8, 8, 8)).save_pretrained(
        tmp_path / "taesd"
    )
    folder = tmp_path / "model"
    shutil.copytree(sd3[1].manifest.folder, folder)
    assert main(["export", "unused-source", "-o", str(folder), "--taesd", str(tmp_path / "taesd")]) == 2


def images(array: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) in [0, 1], as sdrt_run's images (rounded to /255)."""
    return np.round(np.clip(array / 2 + 0.5, 0, 1) * 255).transpose(0, 2, 3, 1) / 255
