"""Rename a diffusers SD 1.x/2.x state dict into the original (CompVis/LDM) single-file layout, for tests.

The inverse of what diffusers' `from_single_file` does, written from the two layouts' block structure:
LDM numbers UNet blocks sequentially (input_blocks.N / output_blocks.N, each holding a resnet, then an
attention or a resampler), and nests the VAE as down.I.block.J / up.I.block.J with up blocks reversed.
SD 1.x files hold the CLIP text encoder in transformers' layout; SD 2.x files hold OpenCLIP's own modules
(resblocks with one packed q/k/v projection, ln_final, text_projection), one block more than SD 2 uses.
"""

import torch

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
TEXT_LAYOUTS = ("clip", "open_clip")
# transformers' CLIP encoder layer part -> OpenCLIP's residual attention block part
OPEN_CLIP_LAYER_PARTS = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}

UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
RESNET_PARTS = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
VAE_RESNET_PARTS = {"conv_shortcut.": "nin_shortcut."}
VAE_ATTENTION_PARTS = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def unet_prefix_map(config) -> dict[str, str]:
    """diffusers UNet key prefix -> LDM key prefix (without model.diffusion_model.)."""
    layers, n = config["layers_per_block"], len(config["block_out_channels"])
    m = dict(UNET_FIXED)
    for i in range(n):
        for j in range(layers):
            m[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(layers + 1) * i + j + 1}.0."
            m[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(layers + 1) * i + j + 1}.1."
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(layers + 1) * (i + 1)}.0.op."
        up_has_attention = "CrossAttn" in config["up_block_types"][i]
        for j in range(layers + 1):
            m[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(layers + 1) * i + j}.0."
            m[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(layers + 1) * i + j}.1."
        if i < n - 1:
            m[f"up_blocks.{i}.upsamplers.0."] = (
                f"output_blocks.{(layers + 1) * i + layers}.{2 if up_has_attention else 1}."
            )
    m["mid_block.attentions.0."] = "middle_block.1."
    for j in range(2):
        m[f"mid_block.resnets.{j}."] = f"middle_block.{2 * j}."
    return m


def vae_prefix_map(config) -> dict[str, str]:
    layers, n = config["layers_per_block"], len(config["block_out_channels"])
    m = {
        "encoder.mid_block.attentions.0.": "encoder.mid.attn_1.",
        "decoder.mid_block.attentions.0.": "decoder.mid.attn_1.",
        "encoder.conv_norm_out.": "encoder.norm_out.",
        "decoder.conv_norm_out.": "decoder.norm_out.",
    }
    for part in ("encoder", "decoder"):
        for j in range(2):
            m[f"{part}.mid_block.resnets.{j}."] = f"{part}.mid.block_{j + 1}."
    for i in range(n):
        for j in range(layers):
            m[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        if i < n - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
            m[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
        for j in range(layers + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
    return m


def _rename(key: str, prefixes: dict[str, str], parts: dict[str, str]) -> str:
    for old in sorted(prefixes, key=len, reverse=True):
        if key.startswith(old):
            rest = key[len(old) :]
            for p_old, p_new in parts.items():
                if rest.startswith(p_old):
                    rest = p_new + rest[len(p_old) :]
                    break
            return prefixes[old] + rest
    return key


def open_clip_state_dict(text_encoder, seed: int = 0) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel as SD 2's OpenCLIP text tower (keys without cond_stage_model.model.).

    SD 2 runs OpenCLIP up to its penultimate block, then ln_final; diffusers' CLIPTextModel holds exactly those
    blocks. The file gets one more block (random, seeded) as a real file's unused last block: loading must skip it.
    """
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    n_layers, width = text_encoder.config.num_hidden_layers, text_encoder.config.hidden_size
    out = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
        # OpenCLIP's projection to the joint image-text space, (width, embed_dim); SD never uses it.
        "text_projection": torch.eye(width),
        "logit_scale": torch.tensor(4.6052),
    }
    for i in range(n_layers):
        layer, block = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            # nn.MultiheadAttention packs q, k and v into one (3 * width, width) projection, in that order.
            qkv = [state[f"{layer}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv)
        for ours, theirs in OPEN_CLIP_LAYER_PARTS.items():
            for kind in ("weight", "bias"):
                out[f"{block}{theirs}{kind}"] = state[f"{layer}{ours}{kind}"]
    generator = torch.Generator().manual_seed(seed)
    last = f"transformer.resblocks.{n_layers}."
    for key, value in list(out.items()):
        if key.startswith(f"transformer.resblocks.{n_layers - 1}."):
            out[last + key.split(".", 3)[3]] = torch.randn(value.shape, generator=generator)
    return {k: v.contiguous() for k, v in out.items()}


def to_ldm_state_dict(pipe, text_layout: str = "clip") -> dict[str, torch.Tensor]:
    """One flat LDM-layout state dict holding the UNet, VAE and text encoder of an SD 1.x or 2.x pipeline.

    TEXT_LAYOUT: "clip" (SD 1.x, transformers' CLIP keys) or "open_clip" (SD 2.x, OpenCLIP's keys).
    """
    if text_layout not in TEXT_LAYOUTS:
        raise ValueError(f"text_layout {text_layout!r}: expected one of {TEXT_LAYOUTS}")
    out = {}
    unet_map = unet_prefix_map(pipe.unet.config)
    for k, v in pipe.unet.state_dict().items():
        parts = RESNET_PARTS if ".resnets." in k else {}
        out[UNET_PREFIX + _rename(k, unet_map, parts)] = v.contiguous()
    vae_map = vae_prefix_map(pipe.vae.config)
    for k, v in pipe.vae.state_dict().items():
        parts = VAE_ATTENTION_PARTS if ".attentions." in k else VAE_RESNET_PARTS
        new = _rename(k, vae_map, parts)
        if ".attn_1." in new and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out[VAE_PREFIX + new] = v.contiguous()
    if text_layout == "open_clip":
        out |= {OPEN_CLIP_PREFIX + k: v for k, v in open_clip_state_dict(pipe.text_encoder).items()}
        return out
    for k, v in pipe.text_encoder.state_dict().items():
        # SD 1.x files hold transformers' CLIPTextModel keys as of 2022, under "text_model."
        out[TEXT_PREFIX + ("" if k.startswith("text_model.") else "text_model.") + k] = v.contiguous()
    return out


# text layout -> the LDM class that held that text encoder (cond_stage_config.target)
LDM_TEXT_ENCODERS = {
    "clip": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
    "open_clip": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
}


def original_config(pipe, text_layout: str = "clip", parameterization: str | None = None) -> dict:
    """The LDM inference YAML (as a dict) describing PIPE's architecture, as shipped beside SD checkpoints.

    PARAMETERIZATION "v" or "eps"; None leaves the key out, as SD 1.x and SD 2 base YAMLs do (LDM's default eps).
    """
    unet, vae = pipe.unet.config, pipe.vae.config
    base = unet["block_out_channels"][0]
    # LDM marks the levels holding attention by their downsampling factor: 1, 2, 4, ...
    attention = [2**i for i, kind in enumerate(unet["down_block_types"]) if kind.startswith("CrossAttn")]
    params = {
        "linear_start": pipe.scheduler.config["beta_start"],
        "linear_end": pipe.scheduler.config["beta_end"],
        "timesteps": pipe.scheduler.config["num_train_timesteps"],
        "image_size": unet["sample_size"],
        "channels": vae["latent_channels"],
        "scale_factor": vae["scaling_factor"],
        "unet_config": {
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {
                "in_channels": unet["in_channels"],
                "out_channels": unet["out_channels"],
                "model_channels": base,
                "attention_resolutions": attention,
                "num_res_blocks": unet["layers_per_block"],
                "channel_mult": [c // base for c in unet["block_out_channels"]],
                "num_head_channels": unet["attention_head_dim"],
                "use_linear_in_transformer": unet["use_linear_projection"],
                "transformer_depth": 1,
                "context_dim": unet["cross_attention_dim"],
            },
        },
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": vae["latent_channels"],
                "ddconfig": {
                    "double_z": True,
                    "z_channels": vae["latent_channels"],
                    "in_channels": vae["in_channels"],
                    "out_ch": vae["out_channels"],
                    "ch": vae["block_out_channels"][0],
                    "ch_mult": [c // vae["block_out_channels"][0] for c in vae["block_out_channels"]],
                    "num_res_blocks": vae["layers_per_block"],
                    "attn_resolutions": [],
                },
            },
        },
        "cond_stage_config": {"target": LDM_TEXT_ENCODERS[text_layout]},
    }
    if parameterization is not None:
        params = {"parameterization": parameterization, **params}
    target = "LatentInpaintDiffusion" if unet["in_channels"] == 9 else "LatentDiffusion"
    return {"model": {"target": f"ldm.models.diffusion.ddpm.{target}", "params": params}}
