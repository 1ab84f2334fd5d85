"""Shared parts of the SD 3.5 / FLUX.1 parity tests: a tiny model exported with `sdrt export` and loaded as an sdrt
Pipeline, and diffusers' pipelines on the same weights and per-image seeds (A1111's seed, seed + 1, ...: one torch
generator per image), images as (B, H, W, 3) float arrays in [0, 1]."""

import numpy as np

SIZE = 64  # pixels: 8x8 latent cells, 16 SD 3 / FLUX image tokens
STEPS = 4


def exported(root, build, **build_kwargs):
    """(diffusers pipeline, sdrt Pipeline) of the tiny model BUILD writes to ROOT/diffusers, exported to ROOT/onnx."""
    from sdrt import Pipeline
    from sdrt.cli import main

    pipe = build(root / "diffusers", **build_kwargs)
    assert main(["export", str(root / "diffusers"), "-o", str(root / "onnx")]) == 0
    return pipe, Pipeline.load(root / "onnx")


def sdrt_run(pipeline, prompt, seeds=(0,), **kwargs):
    """sdrt's images (B, H, W, 3) in [0, 1], or with output_type="latent" the final latents (B, C, h, w)."""
    kwargs = {"steps": STEPS, "width": SIZE, "height": SIZE, **kwargs}
    out = pipeline.generate(prompt, seed=seeds[0], batch_size=len(seeds), progress=False, **kwargs)
    if kwargs.get("output_type") == "latent":
        return out
    return np.stack([np.asarray(image, dtype=np.float64) / 255 for image in out])


def diffusers_run(pipe, prompt, seeds=(0,), steps=STEPS, size=SIZE, output_type="np", **kwargs):
    """diffusers' images (or latents) for the same seeds: one generator per image."""
    import torch

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe([prompt] * len(seeds), height=size, width=size, num_inference_steps=steps, generator=generators,
               output_type=output_type, **kwargs).images  # fmt: skip
    return out.numpy() if output_type == "latent" else out


def max_diff_255(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() * 255)


def init_and_mask(seed: int = 0):
    """(init image, mask image) for 64 px img2img / inpainting tests: noise, and a repainted rectangle."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    pixels = np.zeros((SIZE, SIZE), np.uint8)
    pixels[8:40, 16:56] = 255
    return image, Image.fromarray(pixels, "L")
