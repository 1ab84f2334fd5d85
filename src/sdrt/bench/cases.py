"""The model cases `sdrt bench --model NAME` can build: full-size architectures with random weights (no download).

Add a case (e.g. SDXL) by adding a ModelCase to CASES; the build worker reads its configs, the runners its sizes.
"""

from dataclasses import dataclass, field

from sdrt.bench import flow_arch as flow

# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json): 859.5 M parameters.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# CLIP ViT-L/14's text tower. The tokenizer is the tiny test vocabulary: its ids only index the embedding.
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys that differ from diffusers' defaults).
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + 1280 pooled
    "norm_num_groups": 32,
}
# stabilityai/stable-diffusion-xl-refiner-1.0 unet/config.json: 2.3 B parameters, OpenCLIP bigG context only.
SDXL_REFINER_UNET = dict(
    SDXL_UNET,
    block_out_channels=[384, 768, 1536, 1536],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=4,
    attention_head_dim=[6, 12, 24, 24],
    cross_attention_dim=1280,
    projection_class_embeddings_input_dim=2560,  # 5 time ids x 256 + 1280 pooled
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)  # the SD VAE's layout
CLIP_VIT_L = SD15_TEXT  # SDXL's text_encoder: the same OpenAI CLIP ViT-L/14 text tower
OPEN_CLIP_BIGG = {  # text_encoder_2: OpenCLIP ViT-bigG/14's text tower, with its projection
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
# "small": the same code path on models a few MB in size (a smoke test of the benchmark itself).
SMALL_UNET = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
SMALL_VAE = dict(SD15_VAE, block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=256)
SMALL_TEXT = dict(
    SD15_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64
)


@dataclass(frozen=True)
class ModelCase:
    """One architecture to benchmark and the settings it is measured at on each device."""

    name: str
    description: str
    unet_config: dict
    vae_config: dict
    text_config: dict  # vocab_size None: the tiny tokenizer's size
    cpu: dict = field(default_factory=dict)  # defaults of --size/--steps on the CPU
    gpu: dict = field(default_factory=dict)  # defaults on a GPU (the published peers' settings)
    unet_tflop_per_sample_step: float | None = None  # at 512x512: for the FLOP-rate utilisation figure
    smoke: bool = False  # a smoke test of the benchmark, not a result
    pipeline: str = "sd"  # the builder in random_model.BUILDERS that assembles it ("sd": SD 1.x/2.x; add "sdxl")
    text_configs: dict = field(default_factory=dict)  # the other text encoders' configs (SD 3.5, FLUX: flow_arch.py)
    bf16: bool = False  # build the big parts in bf16 (flow_arch.build_flow)

    def configs(self) -> dict:
        """The build stamp: the same keys as before pipeline kinds existed for "sd" (earlier builds stay reusable)."""
        configs = {"unet_config": self.unet_config, "vae_config": self.vae_config, "text_config": self.text_config}
        if self.text_configs:
            configs |= {"text_configs": self.text_configs, "bf16": self.bf16}
        return configs if self.pipeline == "sd" else {**configs, "pipeline": self.pipeline}


CASES = {
    "sdxl": ModelCase(
        "sdxl",
        "SDXL 1.0 base architecture, random weights",
        SDXL_UNET,
        SDXL_VAE,
        CLIP_VIT_L,
        cpu={"size": 512, "steps": 4},
        gpu={"size": 1024, "steps": 30},
        pipeline="sdxl",
    ),
    "sd15": ModelCase(
        "sd15",
        "SD 1.5 architecture, random weights",
        SD15_UNET,
        SD15_VAE,
        SD15_TEXT,
        cpu={"size": 256, "steps": 10},
        gpu={"size": 512, "steps": 50},  # TensorRT demo / diffusers published settings
        unet_tflop_per_sample_step=0.80,  # SD 1.5 UNet at 512x512 (ARCHITECTURE.md)
    ),
    # SD 3.5 Medium and FLUX.1 dev (unet_config: the transformer's): the GPU machine's (benchmarks/gpu_check.sh --model)
    "sd35m": ModelCase("sd35m", "SD 3.5 Medium architecture, random weights", flow.SD35M_TRANSFORMER, flow.SD3_VAE,
                       CLIP_VIT_L, cpu={"size": 512, "steps": 4}, gpu={"size": 1024, "steps": 28}, pipeline="sd3",
                       text_configs={"text_encoder_2": OPEN_CLIP_BIGG, "text_encoder_3": flow.T5_XXL}, bf16=True),
    "flux-dev": ModelCase("flux-dev", "FLUX.1 dev architecture, random weights", flow.FLUX_DEV_TRANSFORMER,
                          flow.FLUX_VAE, CLIP_VIT_L, cpu={"size": 512, "steps": 4}, gpu={"size": 1024, "steps": 28},
                          pipeline="flux", text_configs={"text_encoder_2": flow.T5_XXL}, bf16=True),
    "small-sd3": ModelCase("small-sd3", "tiny random SD 3.5 (--model small-sd3)", flow.TINY_SD3_TRANSFORMER,
                           dict(flow.TINY_FLOW_VAE, scaling_factor=1.5305, shift_factor=0.0609), flow.TINY_CLIP_L,
                           cpu={"size": 64, "steps": 2}, gpu={"size": 64, "steps": 2}, smoke=True, pipeline="sd3",
                           text_configs={"text_encoder_2": flow.TINY_CLIP_G, "text_encoder_3": flow.TINY_T5}),
    "small-flux": ModelCase("small-flux", "tiny random FLUX.1 dev (--model small-flux)", flow.TINY_FLUX_TRANSFORMER,
                            dict(flow.TINY_FLOW_VAE, scaling_factor=0.3611, shift_factor=0.1159), flow.TINY_CLIP_L,
                            cpu={"size": 64, "steps": 2}, gpu={"size": 64, "steps": 2}, smoke=True, pipeline="flux",
                            text_configs={"text_encoder_2": flow.TINY_T5}),
    "small": ModelCase(
        "small",
        "tiny random models (--model small)",
        SMALL_UNET,
        SMALL_VAE,
        dict(SMALL_TEXT, vocab_size=None),
        cpu={"size": 256, "steps": 10},
        gpu={"size": 256, "steps": 10},
        smoke=True,
    ),
}
