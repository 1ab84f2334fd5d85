"""SD 3.5 export plan (StableDiffusion3Pipeline folders and hub ids): CLIP-L, OpenCLIP bigG and (when present) T5
text encoders with their tokenizers, the MMDiT transformer, the 16-channel VAE; the family's facts for model.json.

Memory: each part is loaded in its stored dtype when its turn comes and released once exported; the T5 encoder goes
part by part (export/t5.py)."""

import torch

from sdrt.export import driver
from sdrt.export.flow_parts import Held, flow_family, flow_scheduler_facts, no_controlnet
from sdrt.export.sd3_gates import gate_blocks
from sdrt.export.steps import ModelStep
from sdrt.runtime.flow_specs import sd3_transformer_spec

CLIP_ENCODERS = ("text_encoder", "text_encoder_2")  # CLIP ViT-L/14, OpenCLIP ViT-bigG/14
T5_ENCODER = "text_encoder_3"
T5_MAX_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length default
CLIP_TOKENS = 77


def sd3_forward(held, hidden_states, timestep, encoder_hidden_states, pooled_projections, block_gates):
    """diffusers' SD3Transformer2DModel call (no ControlNet), its blocks gated (sd3_gates.py: skip-layer guidance)."""
    held.gates["gates"] = block_gates
    return held.inner(
        hidden_states=hidden_states,
        timestep=timestep,
        encoder_hidden_states=encoder_hidden_states,
        pooled_projections=pooled_projections,
        return_dict=False,
    )[0]


def sd3_transformer_step(transformer) -> ModelStep:
    """The MMDiT's export step; latent sizes even (2x2 patches) and different between trace and check."""
    config = transformer.config
    generator = torch.Generator().manual_seed(0)
    channels, joint, pooled = config.in_channels, config.joint_attention_dim, config.pooled_projection_dim
    patch, blocks = config.patch_size, config.num_layers
    held = Held(transformer)
    held.gates = gate_blocks(transformer)

    def inputs(batch, h, w, t, tokens, skipped=()):
        gates = torch.ones(blocks)
        gates[list(skipped)] = 0.0
        return (
            torch.randn(batch, channels, h * patch, w * patch, generator=generator),
            torch.tensor(t),
            torch.randn(batch, tokens, joint, generator=generator),
            torch.randn(batch, pooled, generator=generator),
            gates,
        )

    return ModelStep(
        sd3_transformer_spec(config.out_channels, joint, pooled, blocks),
        held,
        sd3_forward,
        inputs(1, 3, 5, [500.0], CLIP_TOKENS + 13),
        inputs(2, 4, 2, [999.0, 1.0], CLIP_TOKENS + 21, skipped=range(0, blocks, 2)),  # the check skips blocks
    )


def sd3_plan(source, precision: str, original_config, config, vae_option, files=None, part_bytes=None):
    """The plan of an SD 3.5 diffusers folder, hub id or single file (FILES: {flag: component file})."""
    from sdrt.export.flow_single_file import flow_parts
    from sdrt.export.steps import text_encoder_step, vae_steps
    from sdrt.export.t5 import t5_steps

    parts = flow_parts(source, config, vae_option, original_config, files)
    schedule = flow_scheduler_facts(parts.scheduler_config)
    transformer_config = parts.config_of("transformer")
    has_t5 = parts.has(T5_ENCODER)
    made = {}

    def steps():
        for name in CLIP_ENCODERS:
            step = text_encoder_step(parts.get(name), name)
            step.release = lambda name=name: parts.release(name)
            yield step
            tokenizer = name.replace("text_encoder", "tokenizer")
            yield driver.Tokenizer(tokenizer, parts.get(tokenizer), lambda t=tokenizer: parts.release(t))
        if has_t5:
            yield from t5_steps(parts.get(T5_ENCODER), T5_ENCODER, lambda: parts.release(T5_ENCODER), part_bytes)
            yield driver.Tokenizer("tokenizer_3", parts.get("tokenizer_3"), lambda: parts.release("tokenizer_3"))
        step = sd3_transformer_step(parts.get("transformer"))
        step.release = lambda: parts.release("transformer")
        yield step
        del step
        vae = parts.get("vae")
        made["down"] = 2 ** (len(vae.config.block_out_channels) - 1)
        made["vae_config"] = dict(vae.config)
        yield from vae_steps(vae, made["down"])
        parts.release("vae")

    def facts() -> dict:
        down, channels = made["down"], int(transformer_config["in_channels"])
        patch = int(transformer_config["patch_size"])
        native = int(transformer_config["sample_size"]) * down
        return {
            "family": "sd3",
            "prediction_type": "flow",
            "scheduler": driver.scheduler_config({}),
            **driver.vae_facts(made["vae_config"], down),
            "unet_in_channels": channels,
            "native_size": native,
            "detected": {"family": {"value": "sd3", "from": f"{parts.index['_class_name']} (model_index.json)"}},
            "text_max_length": CLIP_TOKENS,
            "text_hidden_size": int(transformer_config["joint_attention_dim"]),
            **driver.source_facts(parts.kind, parts.name, parts.sha256, None),
            "family_config": {
                "flow": schedule,
                "t5": T5_ENCODER if has_t5 else None,
                "t5_max_length": T5_MAX_LENGTH,
                "patch_size": patch,
                "max_latent_size": int(transformer_config["pos_embed_max_size"]) * patch,
            },
        }

    t5_note = "with T5" if has_t5 else "without T5 (text_encoder_3 absent: zeros in its place, as diffusers)"
    t5_note += f"; {parts.note}" if getattr(parts, "note", "") else ""
    description = f"detected family: sd3 ({parts.index['_class_name']}, {t5_note})"
    return driver.ExportPlan(description, steps(), 5 + has_t5, facts, controlnet=False)


FAMILIES = ("sd3",)  # the manifest families this plan writes
plan = sd3_plan
denoiser_step = no_controlnet("SD 3.5")


def claims(source: str, checkpoint) -> bool:
    """The export registry's question: a SD 3.5 diffusers folder or hub id (model_index.json's pipeline class)."""
    return flow_family(source) in FAMILIES
