"""Shared parts of the SD 3.5 / FLUX.1 tests: sdrt's flow runtime driven directly (engines, noise, sampling, VAE)
and diffusers' pipelines on the same weights and seeds, both as (B, H, W, 3) float images in [0, 1]."""

import numpy as np

from sdrt.engines import create_engine
from sdrt.runtime.flow_family import flow_latents
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.rng import TorchCPUGenerator
from sdrt.runtime.vae import Vae

SIZE = 64  # pixels: 8x8 latent cells, 16 SD 3 / FLUX image tokens
STEPS = 4


class _Whole:
    """A memory plan that never tiles the VAE."""

    def tiles(self, shape) -> bool:
        return False


class FlowRun:
    """An exported flow model loaded on ONNX Runtime's CPU engines."""

    def __init__(self, folder):
        self.manifest = Manifest.load(folder)
        self.engines = {name: create_engine(self.manifest.model_path(name), "cpu") for name in self.manifest.models}
        self.vae = Vae(self.manifest, self.engines, _Whole())

    def latents(self, prompts, seed=0, steps=STEPS, size=SIZE, guidance=7.0, noise=None, **kwargs) -> np.ndarray:
        shape = (len(prompts), self.manifest.latent_channels, size // 8, size // 8)
        if noise is None:
            noise = TorchCPUGenerator(seed).randn(shape)  # torch.randn(shape, generator=manual_seed(seed))
        return flow_latents(self.manifest, self.engines, list(prompts), noise, steps, guidance, **kwargs)

    def images(self, prompts, **kwargs) -> np.ndarray:
        decoded = self.vae.decode(self.latents(prompts, **kwargs))  # (B, 3, H, W) in [-1, 1]
        return np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


def encode_image(run: FlowRun, image, generator) -> np.ndarray:
    """(1, C, h, w) scaled latents of a PIL IMAGE: one VAE posterior sample drawn from GENERATOR (diffusers'
    retrieve_latents in "sample" mode), shifted and scaled."""
    from sdrt.runtime.image import from_pil

    out = run.engines["vae_encoder"].run({"sample": from_pil(image)})
    mean, logvar = out["latent_mean"], out["latent_logvar"]
    z = mean + np.exp(np.float32(0.5) * logvar) * generator.randn(mean.shape)
    m = run.manifest
    return ((z - np.float32(m.vae_shift_factor)) * np.float32(m.vae_scaling_factor)).astype(np.float32)


def diffusers_images(pipe, prompts, seed=0, steps=STEPS, size=SIZE, guidance=7.0, **kwargs) -> np.ndarray:
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = pipe(list(prompts), height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
               generator=generator, output_type="np", **kwargs)  # fmt: skip
    return out.images


def max_diff_255(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() * 255)


def inpaint_inputs(seed: int = 0):
    """(init image, mask image, (1, 1, h, w) latent mask) for a 64 px inpainting test: the mask repaints a
    rectangle; diffusers binarises it at 0.5 and takes every 8th pixel (nearest) for the latents."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    pixels = np.zeros((SIZE, SIZE), np.uint8)
    pixels[8:40, 16:56] = 255
    latent_mask = (pixels[::8, ::8] >= 128).astype(np.float32)[None, None]
    return image, Image.fromarray(pixels), latent_mask
