"""Rename a diffusers SD 1.x state dict into the original (CompVis/LDM) single-file layout, for tests.

The inverse of what diffusers' `from_single_file` does, written from the two layouts' block structure:
LDM numbers UNet blocks sequentially (input_blocks.N / output_blocks.N, each holding a resnet, then an
attention or a resampler), and nests the VAE as down.I.block.J / up.I.block.J with up blocks reversed.
"""

import torch

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."

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


def to_ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """One flat LDM-layout state dict holding the UNet, VAE and CLIP text encoder of an SD 1.x pipeline."""
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
    for k, v in pipe.text_encoder.state_dict().items():
        # SD 1.x files hold transformers' CLIPTextModel keys as of 2022, under "text_model."
        out[TEXT_PREFIX + ("" if k.startswith("text_model.") else "text_model.") + k] = v.contiguous()
    return out
