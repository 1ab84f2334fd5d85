"""Build tiny random FLUX.1 pipelines (FluxPipeline: dev with its guidance input, schnell without) offline.

Shaped like FLUX.1: CLIP ViT-L-like text encoder (pooled state only), T5 v1.1-like encoder (per-token states),
a transformer of double- and single-stream blocks over 2x2-packed latents with 3-axis rotary position ids, a
16-channel VAE with FLUX's scaling and shift factors, and the published scheduler configs (dev: resolution-dependent
shift; schnell: no shift).
"""

from pathlib import Path

from tiny_sd3 import flow_vae, save_pipeline, scale_output
from tiny_sdxl import CLIP_WIDTH, _text_encoder
from tiny_t5 import T5_WIDTH, tiny_t5_encoder, write_tiny_t5_tokenizer

from sdrt.bench.fixtures import write_tiny_clip_tokenizer

# black-forest-labs/FLUX.1-dev and FLUX.1-schnell scheduler/scheduler_config.json, as published.
FLUX_DEV_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
FLUX_SCHNELL_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}


def build_tiny_flux(folder, variant: str = "dev", seed: int = 0, out_gain: float = 10.0):
    """Save a tiny random FluxPipeline (VARIANT "dev": guidance-distilled, "schnell": timestep-distilled) to
    FOLDER and return it loaded back (float32)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer

    folder = Path(folder)
    scheduler = {"dev": FLUX_DEV_SCHEDULER, "schnell": FLUX_SCHNELL_SCHEDULER}[variant]
    vocab = write_tiny_clip_tokenizer(folder / "tokenizer_src")
    tokenizer_2 = write_tiny_t5_tokenizer(folder / "tokenizer_2_src")
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x a 2x2 patch
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=variant == "dev",
        axes_dims_rope=(2, 2, 4),
    )
    scale_output(transformer, out_gain)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler),
        vae=flow_vae(**FLUX_VAE),
        text_encoder=_text_encoder(vocab, CLIP_WIDTH, "quick_gelu", None),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer_src"),
        text_encoder_2=tiny_t5_encoder(len(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return save_pipeline(pipe, folder, scheduler)
