"""Build tiny random Stable Diffusion pipelines in diffusers format, offline (test fixtures)."""

import json
from pathlib import Path

from sdrt.bench.fixtures import (  # noqa: F401 - the tests import them from here
    CORPUS_WORDS,
    SD15_SCHEDULER,
    SD15_SCHEDULER_KWARGS,
    assemble_pipeline,
    byte_chars,
    write_tiny_clip_tokenizer,
)


def tiny_vae(**overrides):
    """A tiny AutoencoderKL with SD's layout (4 blocks, 8 pixels per latent cell, 4 latent channels)."""
    from diffusers import AutoencoderKL

    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    return AutoencoderKL(**{**config, **overrides})


# What makes a tiny model SD 2-like: SD 2's tokenizer pads with "!", its OpenCLIP text encoder uses exact GELU,
# its UNet projects attention with linear layers and upcasts attention, and it is trained at 96 latent cells
# (768 px; the tiny one: 12 cells, 96 px).
FAMILY_OPTIONS = {
    "sd1": {"pad_token": "<|endoftext|>", "hidden_act": "quick_gelu", "unet": {"sample_size": 8}},
    "sd2": {
        "pad_token": "!",
        "hidden_act": "gelu",
        "unet": {"sample_size": 12, "use_linear_projection": True, "upcast_attention": True},
    },
}


def build_tiny_sd(
    folder,
    seed: int = 0,
    prediction_type: str = "epsilon",
    out_gain: float = 10.0,
    family: str = "sd1",
    unet_in_channels: int = 4,
):
    """Save a tiny random SD 1.x- or 2.x-shaped StableDiffusionPipeline to FOLDER and return it loaded back (float32).

    The UNet's conv_out is scaled by OUT_GAIN: a random UNet predicts small unstructured noise, under which
    every sampler gives nearly the same image and a parity test could not fail.
    """
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    options = FAMILY_OPTIONS[family]
    vocab_size = write_tiny_clip_tokenizer(folder / "tokenizer_src", pad_token=options["pad_token"])
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer_src")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **options["unet"],
        in_channels=unet_in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    with torch.no_grad():
        unet.conv_out.weight.mul_(out_gain)
        unet.conv_out.bias.mul_(out_gain)
    vae = tiny_vae()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=3,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            hidden_act=options["hidden_act"],
        )
    )
    with torch.no_grad():  # trained CLIPs' final layer norms are far from the identity; A1111's emphasis
        # rescales by the conditioning's mean, which an identity norm would leave at exactly 0
        text_encoder.final_layer_norm.weight.uniform_(0.5, 1.5)
        text_encoder.final_layer_norm.bias.normal_(0.3, 0.5)
    scheduler_config = dict(SD15_SCHEDULER, prediction_type=prediction_type)
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler_config)
    pipe.save_pretrained(folder)
    # Keep the scheduler config exactly as SD 1.5 publishes it: keys it leaves out (timestep_spacing) take
    # each diffusers scheduler class's own default, which sdrt must reproduce.
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    loaded = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    return loaded
