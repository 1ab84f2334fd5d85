"""Latents -> images without the full VAE: TAESD (Tiny AutoEncoder for SD, madebyollin/taesd; diffusers'
AutoencoderTiny) as an optional decoder of a model folder, and A1111's live preview methods.

TAESD's decoder takes the latents the UNet works in (already scaled) and returns an image in [-1, 1] at the full
size; its graph is the manifest's optional "taesd_decoder" model (export/taesd.py). A1111's preview methods
(modules/sd_samplers_common.py, samples_to_images_tensor):
  Full          the model's VAE decoder
  Approx cheap  a fixed linear map of the 4 latent channels to RGB at the latent size (sd_vae_approx.py's
                coefficients for SD 1.x/2.x and for SDXL), no model at all
  Approx NN     A1111's small convolutional network (sd_vae_approx.py's VAEApprox), the folder's optional
                "vae_approx" graph exported from the file A1111 users have (export/vae_approx.py): images at twice
                the latent size. A folder without it serves TAESD in its place, else Approx cheap (A1111 downloads
                the file instead; sdrt cannot, and the server's default method must work on every folder)
  TAESD         the taesd_decoder graph (Approx cheap when the folder has none)
"""

import numpy as np

from sdrt.errors import ModelError
from sdrt.runtime.modelspec import ModelSpec, TensorSpec

TAESD_DECODER = "taesd_decoder"
VAE_APPROX = "vae_approx"  # A1111's Approx NN
PREVIEW_METHODS = ("Full", "Approx NN", "Approx cheap", "TAESD")
PREVIEW_CONTENTS = ("Combined", "Prompt", "Negative prompt")  # A1111's live_preview_content
VAE_DECODERS = {"full": "Full", "taesd": "TAESD"}  # sdrt's `vae` option -> A1111's sd_vae_decode_method

# A1111's "Approx cheap" latent -> RGB coefficients (sd_vae_approx.py), (latent channel, RGB): SD 1.x/2.x latents,
# and SDXL's; each family declares its own (families/, Family.preview_rgb).
SD_PREVIEW_RGB = np.array(
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]], np.float32
)
SDXL_PREVIEW_RGB = np.array(
    [[0.3448, 0.4168, 0.4395], [-0.1953, -0.0290, 0.0250], [0.1074, 0.0886, -0.0163], [-0.3730, -0.2499, -0.2088]],
    np.float32,
)


# The 16-channel latents' (channel, RGB) coefficients, as Forge's cheap_approximation takes them from each model's
# latent format (ComfyUI's latent_formats.py, SD3 and Flux; their RGB bias left out, as Forge does).
SD3_PREVIEW_RGB = np.array(
    [[-0.0922, -0.0175, 0.0749], [0.0311, 0.0633, 0.0954], [0.1994, 0.0927, 0.0458], [0.0856, 0.0339, 0.0902],
     [0.0587, 0.0272, -0.0496], [-0.0006, 0.1104, 0.0309], [0.0978, 0.0306, 0.0427], [-0.0042, 0.1038, 0.1358],
     [-0.0194, 0.0020, 0.0669], [-0.0488, 0.0130, -0.0268], [0.0922, 0.0988, 0.0951], [-0.0278, 0.0524, -0.0542],
     [0.0332, 0.0456, 0.0895], [-0.0069, -0.0030, -0.0810], [-0.0596, -0.0465, -0.0293], [-0.1448, -0.1463, -0.1189]],
    np.float32,
)  # fmt: skip
FLUX_PREVIEW_RGB = np.array(
    [[-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433], [-0.0174, 0.0160, 0.0617],
     [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115], [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259],
     [-0.0245, 0.0250, 0.1180], [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
     [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499], [-0.1262, -0.0982, -0.0778]],
    np.float32,
)  # fmt: skip


def taesd_decoder_spec(latent_channels: int) -> ModelSpec:
    """TAESD decoder: the UNet's (scaled) latents -> image in [-1, 1], 8 pixels per latent cell."""
    return ModelSpec(
        TAESD_DECODER,
        inputs=(TensorSpec("latent_sample", "float32", ("batch", latent_channels, "latent_height", "latent_width")),),
        outputs=(TensorSpec("sample", "float32", ("batch", 3, "height", "width")),),
    )


def vae_approx_spec(latent_channels: int) -> ModelSpec:
    """A1111's Approx NN: the UNet's (scaled) latents -> image roughly in [-1, 1] at twice the latent size."""
    return ModelSpec(
        VAE_APPROX,
        inputs=(TensorSpec("latent_sample", "float32", ("batch", latent_channels, "latent_height", "latent_width")),),
        outputs=(TensorSpec("sample", "float32", ("batch", 3, "height", "width")),),
    )


def has_taesd(manifest) -> bool:
    return TAESD_DECODER in manifest.models


def taesd_decode(manifest, engines: dict, latents: np.ndarray) -> np.ndarray:
    """(B, C, h, w) UNet latents -> (B, 3, 8h, 8w) float32 images in [-1, 1], one image per TAESD call."""
    if not has_taesd(manifest):
        raise ModelError(
            f"{manifest.folder} has no TAESD decoder: add one with `sdrt export SOURCE -o {manifest.folder} --taesd "
            "TAESD` (a diffusers AutoencoderTiny folder, hub id, or taesd_decoder.pth/.safetensors)"
        )
    engine = engines[TAESD_DECODER]
    z = latents.astype(np.float32)
    return np.concatenate([engine.run({"latent_sample": z[i : i + 1]})["sample"] for i in range(len(z))])


def approx_nn(engines: dict, latents: np.ndarray) -> np.ndarray:
    """A1111's Approx NN: (B, C, h, w) latents -> (B, 3, 2h, 2w) float32 images roughly in [-1, 1], one a call."""
    z = latents.astype(np.float32)
    return np.concatenate([engines[VAE_APPROX].run({"latent_sample": z[i : i + 1]})["sample"] for i in range(len(z))])


def cheap_approximation(coefficients: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """A1111's "Approx cheap": (B, C, h, w) latents -> (B, 3, h, w) float32 roughly in [-1, 1], by the family's
    (C, 3) COEFFICIENTS."""
    if latents.shape[1] != coefficients.shape[0]:
        raise ModelError(f"Approx cheap previews of this model take {coefficients.shape[0]} latent channels, not "
                         f"{latents.shape[1]}")  # fmt: skip
    return np.einsum("bchw,cr->brhw", latents.astype(np.float32), coefficients).astype(np.float32)


def preview_method(manifest, method: str) -> str:
    """The method that will run for METHOD on this model (a missing Approx NN or TAESD falls back, as documented)."""
    if method == "Approx NN" and VAE_APPROX in manifest.models:
        return method
    if method in ("Approx NN", "TAESD"):
        return "TAESD" if has_taesd(manifest) else "Approx cheap"
    return method


def preview_images(model, latents: np.ndarray, method: str = "TAESD") -> np.ndarray:
    """(B, C, h, w) latents -> (B, 3, H, W) float32 images in [-1, 1] by A1111's preview METHOD (PREVIEW_METHODS) on
    MODEL (generation.Model); Approx cheap gives latent-sized images (h, w), Approx NN twice that."""
    if method not in PREVIEW_METHODS:
        from sdrt.errors import InvalidOption

        raise InvalidOption("show_progress_type", method, ", ".join(PREVIEW_METHODS))
    method = preview_method(model.manifest, method)
    if method == "Approx NN":
        return approx_nn(model.engines, latents)
    if method == "TAESD":
        return taesd_decode(model.manifest, model.engines, latents)
    if method == "Approx cheap":
        return cheap_approximation(model.family.preview_rgb, latents)
    return model.vae.decode(latents)
