"""Build tiny random SDXL pipelines (base, refiner, Turbo-configured base) in diffusers format, offline.

Shaped like SDXL 1.0: two text encoders (CLIP ViT-L-like, quick_gelu, end-token padding; OpenCLIP bigG-like,
gelu, "!" padding, with a text projection), penultimate hidden states concatenated for cross-attention, a UNet
with "text_time" added conditioning (pooled text embeddings + 6 micro-conditioning numbers; the refiner: only
the second encoder and 5 numbers, the last an aesthetic score), and a VAE with SDXL's scaling factor.
"""

import json
from pathlib import Path

from sdrt.bench.fixtures import SDXL_SCHEDULER, write_tiny_clip_tokenizer

# stabilityai/sdxl-turbo: Euler ancestral with trailing spacing (its 1 to 4 steps start at the last timestep).
SDXL_TURBO_SCHEDULER = {
    **{k: v for k, v in SDXL_SCHEDULER.items() if k != "use_karras_sigmas"},
    "_class_name": "EulerAncestralDiscreteScheduler",
    "timestep_spacing": "trailing",
}
SDXL_VAE_SCALING_FACTOR = 0.13025
TIME_EMBED_DIM = 8  # addition_time_embed_dim (SDXL: 256)
# Different widths, as in SDXL: diffusers tells the two towers of a single file apart by their width.
CLIP_WIDTH, OPEN_CLIP_WIDTH, PROJECTION = 32, 48, 32  # SDXL: 768, 1280, 1280
TEXT_LAYERS = 3


def _text_encoder(vocab_size: int, width: int, hidden_act: str, projection: int | None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=TEXT_LAYERS,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act=hidden_act,
        projection_dim=projection or width,
    )
    return CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)


def _unet(context_dim: int, time_ids: int, out_gain: float, in_channels: int = 4, sample_size: int = 8):
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=context_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=time_ids * TIME_EMBED_DIM + PROJECTION,
        norm_num_groups=16,
    )
    with torch.no_grad():
        unet.conv_out.weight.mul_(out_gain)
        unet.conv_out.bias.mul_(out_gain)
    return unet


def _vae():
    from tiny_sd import tiny_vae

    return tiny_vae(scaling_factor=SDXL_VAE_SCALING_FACTOR, force_upcast=True)


def _save(pipe, folder: Path, scheduler_config: dict, cls):
    import torch

    pipe.save_pretrained(folder)
    # The scheduler config exactly as published: keys it leaves out take each scheduler class's defaults.
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    loaded = cls.from_pretrained(folder, torch_dtype=torch.float32, add_watermarker=False)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def build_tiny_sdxl(
    folder, seed: int = 0, out_gain: float = 10.0, scheduler_config: dict = SDXL_SCHEDULER, unet_in_channels: int = 4
):
    """Save a tiny random SDXL base StableDiffusionXLPipeline to FOLDER and return it loaded back (float32).
    UNET_IN_CHANNELS 9: an SDXL inpainting model's UNet (latents, mask, masked-image latents)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    vocab = write_tiny_clip_tokenizer(folder / "tokenizer_src")
    write_tiny_clip_tokenizer(folder / "tokenizer_2_src", pad_token="!")
    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(vocab, CLIP_WIDTH, "quick_gelu", None),
        text_encoder_2=_text_encoder(vocab, OPEN_CLIP_WIDTH, "gelu", PROJECTION),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer_src"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2_src"),
        unet=_unet(CLIP_WIDTH + OPEN_CLIP_WIDTH, 6, out_gain, in_channels=unet_in_channels),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _save(pipe, folder, scheduler_config, StableDiffusionXLPipeline)


def build_tiny_sdxl_refiner(folder, base, seed: int = 1, out_gain: float = 10.0):
    """A tiny SDXL refiner (StableDiffusionXLImg2ImgPipeline) sharing BASE's VAE and second text encoder, as
    SDXL 1.0's refiner does: no first text encoder, aesthetic-score conditioning, no zeroed empty prompts."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    torch.manual_seed(seed)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=_unet(OPEN_CLIP_WIDTH, 5, out_gain),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    return _save(pipe, Path(folder), SDXL_SCHEDULER, StableDiffusionXLImg2ImgPipeline)
