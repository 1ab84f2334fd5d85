"""FLUX.1 export plan (FluxPipeline folders and hub ids: dev, schnell): the CLIP-L text encoder (pooled state only),
the T5 encoder (part by part, export/t5.py), both tokenizers, the transformer over packed latents, the 16-channel
VAE; the family's facts for model.json."""

import torch

from sdrt.errors import ModelError
from sdrt.export import driver
from sdrt.export.flow_parts import (
    Held,
    exportable_norms,
    flow_family,
    flow_scheduler_facts,
    no_controlnet,
    traceable_rotary,
)
from sdrt.export.steps import ModelStep
from sdrt.runtime.flow_specs import flux_transformer_spec

T5_ENCODER = "text_encoder_2"
T5_MAX_LENGTH = 512  # FluxPipeline's max_sequence_length default (its maximum)
CLIP_TOKENS = 77
PACK = 2  # latents are packed in 2x2 patches: (C, h, w) -> (h/2 * w/2, 4C)


def flux_forward(held, hidden_states, timestep, encoder_hidden_states, pooled_projections, img_ids, txt_ids,
                 guidance=None):  # fmt: skip
    """diffusers' FluxTransformer2DModel call (no ControlNet, no IP-Adapter)."""
    with traceable_rotary():
        return held.inner(
            hidden_states=hidden_states,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]


def flux_transformer_step(transformer) -> ModelStep:
    """The transformer's export step; image and text token counts differ between trace and check."""
    config = transformer.config
    generator = torch.Generator().manual_seed(0)
    channels, joint, pooled = config.in_channels, config.joint_attention_dim, config.pooled_projection_dim
    guided = bool(config.guidance_embeds)
    exportable_norms(transformer)

    def inputs(batch, h, w, t, tokens):
        ids = torch.zeros(h, w, 3)
        ids[..., 1] += torch.arange(h)[:, None]
        ids[..., 2] += torch.arange(w)[None, :]
        out = (
            torch.randn(batch, h * w, channels, generator=generator),
            torch.tensor(t),
            torch.randn(batch, tokens, joint, generator=generator),
            torch.randn(batch, pooled, generator=generator),
            ids.reshape(h * w, 3),
            torch.zeros(tokens, 3),
        )
        return out + ((torch.full((batch,), 3.5),) if guided else ())

    return ModelStep(
        flux_transformer_spec(channels, joint, pooled, guided),
        Held(transformer),
        flux_forward,
        inputs(1, 3, 5, [0.5], 13),
        inputs(2, 4, 2, [0.999, 0.01], 21),
    )


def flux_plan(source, precision: str, original_config, config, vae_option, files=None, part_bytes=None):
    """The plan of a FLUX.1 diffusers folder, hub id or single file (FILES: {flag: component file}); the
    transformer in parts of PART_BYTES fp32 weight bytes (export/flux_parts.py) when it is larger."""
    from sdrt.export.flow_single_file import flow_parts
    from sdrt.export.flux_parts import empty_transformer, part_bounds
    from sdrt.export.steps import text_encoder_step, vae_steps
    from sdrt.export.t5 import t5_steps

    parts = flow_parts(source, config, vae_option, original_config, files)
    schedule = flow_scheduler_facts(parts.scheduler_config)
    transformer_config = parts.config_of("transformer")
    for name in ("text_encoder", T5_ENCODER):
        if not parts.has(name):
            raise ModelError(f"{source!r} has no {name}: FLUX.1 needs CLIP-L (text_encoder) and T5 ({T5_ENCODER})")
    model = empty_transformer(transformer_config)  # parameters on the meta device until a part needs them
    bounds = part_bounds(model, part_bytes)
    made = {}

    def steps():
        step = text_encoder_step(parts.get("text_encoder"), "text_encoder")
        step.release = lambda: parts.release("text_encoder")
        yield step
        yield driver.Tokenizer("tokenizer", parts.get("tokenizer"), lambda: parts.release("tokenizer"))
        yield from t5_steps(parts.get(T5_ENCODER), T5_ENCODER, lambda: parts.release(T5_ENCODER), part_bytes)
        yield driver.Tokenizer("tokenizer_2", parts.get("tokenizer_2"), lambda: parts.release("tokenizer_2"))
        yield from transformer_steps(model, parts.weights("transformer"), bounds)
        vae = parts.get("vae")
        made["down"] = 2 ** (len(vae.config.block_out_channels) - 1)
        made["vae_config"] = dict(vae.config)
        yield from vae_steps(vae, made["down"])
        parts.release("vae")

    guided = bool(transformer_config.get("guidance_embeds", False))

    def facts() -> dict:
        down = made["down"]
        return {
            "family": "flux",
            "prediction_type": "flow",
            "scheduler": driver.scheduler_config({}),
            **driver.vae_facts(made["vae_config"], down),
            "unet_in_channels": int(made["vae_config"]["latent_channels"]),
            "native_size": 1024,  # FLUX.1 is trained up to 1024 px (its configs give no sample size)
            "detected": {
                "family": {"value": "flux", "from": f"{parts.index['_class_name']} (model_index.json)"},
                "variant": {"value": "dev" if guided else "schnell", "from": "transformer guidance_embeds"},
            },
            "text_max_length": CLIP_TOKENS,
            "text_hidden_size": int(transformer_config["joint_attention_dim"]),
            **driver.source_facts(parts.kind, parts.name, parts.sha256, None),
            "family_config": {
                "flow": schedule,
                "t5": T5_ENCODER,
                "t5_max_length": T5_MAX_LENGTH,
                "guidance_embeds": guided,
                "pack": PACK,
            },
        }

    variant = "dev: guidance input" if guided else "schnell: no guidance input"
    split = f", transformer in {len(bounds)} parts" if len(bounds) > 1 else ""
    description = f"detected family: flux ({parts.index['_class_name']}, {variant}{split})"
    return driver.ExportPlan(description, steps(), 5 + len(bounds), facts, controlnet=False)


def transformer_steps(model, source, bounds):
    """The transformer's export steps: one graph, or its parts (export/flux_parts.py); weights from SOURCE."""
    from sdrt.export import lazy_weights as lazy
    from sdrt.export.flux_parts import flux_part_steps

    if len(bounds) > 1:
        yield from flux_part_steps(model, dict(model.config), source, bounds)
        return
    lazy.fill(model, source, dtype=torch.float32)
    step = flux_transformer_step(model)
    step.release = lambda: lazy.drop(model)
    yield step


FAMILIES = ("flux",)  # the manifest families this plan writes
plan = flux_plan
denoiser_step = no_controlnet("FLUX.1")


def claims(source: str, checkpoint) -> bool:
    """The export registry's question: a FLUX.1 diffusers folder or hub id (model_index.json's pipeline class)."""
    return flow_family(source) in FAMILIES
