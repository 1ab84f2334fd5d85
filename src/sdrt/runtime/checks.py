"""Run-time checks on what the models return: NaN or Inf is a clear error, never a black image."""

import numpy as np

from sdrt.errors import ModelError

# What produced each checked array, and the model whose fp16 overflow is the usual cause.
STAGES = {"latents": "unet", "images": "vae_decoder", "init latents": "vae_encoder"}


def require_finite(array: np.ndarray, stage: str, manifest) -> np.ndarray:
    """ARRAY unchanged if every value is finite; else ModelError naming STAGE, the model and what to do."""
    if np.isfinite(array).all():
        return array
    model = STAGES[stage]
    entry = manifest.models.get(model, {})
    bad = int(array.size - np.isfinite(array).sum())
    message = f"the {stage} hold {bad} NaN or Inf values out of {array.size} ({model} of {manifest.folder})"
    if entry.get("precision") == "fp16" and model.startswith("vae"):
        message += (
            ": this VAE overflows in fp16 (SDXL's does); re-export with --precision fp32, or with --vae and a VAE "
            "fixed for fp16"
        )
    elif entry.get("precision") == "fp16":
        message += ": the fp16 model overflowed; re-export it with --precision fp32"
    else:
        message += ": the model's weights or inputs give non-finite values"
    raise ModelError(message)
