"""The VAE at run time: images -> scaled latents (encoder, one posterior sample per image) and back (decoder),
whole or in tiles (tiling.py) as the memory plan says."""

import numpy as np

from sdrt.errors import ModelError
from sdrt.runtime.rng import ImageNoise
from sdrt.runtime.tiling import decode_tiled, encode_tiled


class Vae:
    """A model's VAE engines with its scaling (and SDXL-style shift) factors."""

    def __init__(self, manifest, engines: dict, memory, backend: str | None = None):
        from sdrt.runtime.vae_swap import SwappedVaes

        self.manifest, self.engines, self.memory = manifest, engines, memory
        self.swaps = SwappedVaes(self, backend)  # other VAEs run in this one's place (vae_swap.py), by folder

    def using(self, vae_file) -> "Vae":
        """This VAE, or with VAE_FILE (an exported VAE folder: the option vae_file) that VAE in its place."""
        return self.swaps.get(vae_file)

    def encode(self, images: np.ndarray, noise: ImageNoise) -> np.ndarray:
        """(1, 3, H, W) image in [-1, 1] -> (B, C, h, w) scaled latents: one sample of the VAE posterior per image,
        from that image's generator (diffusers' retrieve_latents in "sample" mode)."""
        manifest = self.manifest
        if "vae_encoder" not in self.engines:
            raise ModelError(f"{manifest.folder} has no VAE encoder: re-export the model with this sdrt")
        if self.memory.tiles([side // manifest.latent_downsample for side in images.shape[2:]]):
            out = encode_tiled(self.engines["vae_encoder"], images.astype(np.float32), *self.memory.tiling)
        else:
            out = self.engines["vae_encoder"].run({"sample": images.astype(np.float32)})
        mean, logvar = out["latent_mean"], out["latent_logvar"]  # (1, C, h, w) float32 each
        z = mean + np.exp(np.float32(0.5) * logvar) * noise()  # (B, C, h, w)
        if manifest.vae_shift_factor is not None:
            z = z - np.float32(manifest.vae_shift_factor)
        return (z * np.float32(manifest.vae_scaling_factor)).astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(B, C, h, w) latents -> (B, 3, H, W) float32 images in [-1, 1], one image per VAE call."""
        scaled = latents / np.float32(self.manifest.vae_scaling_factor)
        if self.manifest.vae_shift_factor is not None:
            scaled = scaled + np.float32(self.manifest.vae_shift_factor)
        vae = self.engines["vae_decoder"]
        if self.memory.tiles(scaled.shape):  # overlapping tiles, blended (tiling.py)
            return np.concatenate([decode_tiled(vae, z[None], *self.memory.tiling) for z in scaled.astype(np.float32)])
        return np.concatenate([vae.run({"latent_sample": z[None]})["sample"] for z in scaled.astype(np.float32)])
