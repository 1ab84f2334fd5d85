"""Build a tiny random Stable Diffusion 3.5 pipeline (StableDiffusion3Pipeline) in diffusers format, offline.

Shaped like SD 3.5 Medium: CLIP ViT-L-like and OpenCLIP bigG-like text encoders with projections (penultimate
states concatenated, pooled states concatenated), a T5 v1.1-like encoder, an MMDiT-X transformer (a dual-attention
layer, RMS q/k norms, 2x2 patches, cropped position embeddings), a 16-channel VAE with SD 3's scaling and shift
factors, and SD 3.5's scheduler config (flow matching, static shift 3.0).
"""

import json
from pathlib import Path

from tiny_sdxl import CLIP_WIDTH, OPEN_CLIP_WIDTH, _text_encoder
from tiny_t5 import T5_WIDTH, tiny_t5_encoder, write_tiny_t5_tokenizer

from sdrt.bench.fixtures import write_tiny_clip_tokenizer

# stabilityai/stable-diffusion-3.5-medium scheduler/scheduler_config.json, as published.
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
# The VAE's latent statistics (stable-diffusion-3.5-medium vae/config.json); FLUX's differ.
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
LATENT_CHANNELS = 16
SAMPLE_SIZE = 8  # latent cells (SD 3.5 Medium: 128, i.e. 1024 px)


def flow_vae(scaling_factor: float, shift_factor: float):
    """A tiny 16-channel AutoencoderKL without quant convs (SD 3 and FLUX), 8 pixels per latent cell."""
    from tiny_sd import tiny_vae

    return tiny_vae(
        latent_channels=LATENT_CHANNELS,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        block_out_channels=(8, 8, 16, 16),
        norm_num_groups=8,
    )


def scale_output(module, gain: float) -> None:
    """Multiply the final projection by GAIN: a random transformer's small outputs would hide wrong settings."""
    import torch

    with torch.no_grad():
        module.proj_out.weight.mul_(gain)
        module.proj_out.bias.mul_(gain)


def save_pipeline(pipe, folder: Path, scheduler_config: dict, **absent):
    """save_pretrained, the scheduler config exactly as published, then the pipeline loaded back in float32 (ABSENT:
    optional parts given as None)."""
    import torch

    pipe.save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    loaded = type(pipe).from_pretrained(folder, torch_dtype=torch.float32, **absent)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def build_tiny_sd3(folder, seed: int = 0, out_gain: float = 10.0, with_t5: bool = True, num_layers: int = 2):
    """Save a tiny random StableDiffusion3Pipeline to FOLDER and return it loaded back (float32). WITH_T5 False:
    no text_encoder_3 / tokenizer_3 (diffusers then conditions on zeros in T5's place)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    vocab = write_tiny_clip_tokenizer(folder / "tokenizer_src")
    write_tiny_clip_tokenizer(folder / "tokenizer_2_src", pad_token="!")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=SAMPLE_SIZE,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=CLIP_WIDTH + OPEN_CLIP_WIDTH,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    scale_output(transformer, out_gain)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER),
        vae=flow_vae(**SD3_VAE),
        text_encoder=_text_encoder(vocab, CLIP_WIDTH, "quick_gelu", CLIP_WIDTH),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer_src"),
        text_encoder_2=_text_encoder(vocab, OPEN_CLIP_WIDTH, "gelu", OPEN_CLIP_WIDTH),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2_src"),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    if with_t5:
        tokenizer_3 = write_tiny_t5_tokenizer(folder / "tokenizer_3_src")
        pipe.register_modules(text_encoder_3=tiny_t5_encoder(len(tokenizer_3)), tokenizer_3=tokenizer_3)
    absent = {} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    return save_pipeline(pipe, folder, SD3_SCHEDULER, **absent)
