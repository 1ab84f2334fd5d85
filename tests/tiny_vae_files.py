"""Tiny VAE files as people download them, for sd_vae / --vae tests: a diffusers AutoencoderKL folder, and the same
weights in the original LDM layout (first_stage_model-style keys, as vae-ft-mse-840000-ema-pruned) as .safetensors
and as a plain tensor pickle (.pt). LDM keys are written by ldm_vae_weights, the inverse of diffusers'
convert_ldm_vae_checkpoint (checked by a round trip through it)."""

import re

# diffusers key part -> LDM key part, applied in order (the up blocks' index reversal is done separately)
_RENAMES = (
    (r"down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.block.\2."),
    (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
    (r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}."),
    (r"mid_block\.attentions\.0\.group_norm\.", "mid.attn_1.norm."),
    (r"mid_block\.attentions\.0\.to_q\.", "mid.attn_1.q."),
    (r"mid_block\.attentions\.0\.to_k\.", "mid.attn_1.k."),
    (r"mid_block\.attentions\.0\.to_v\.", "mid.attn_1.v."),
    (r"mid_block\.attentions\.0\.to_out\.0\.", "mid.attn_1.proj_out."),
    (r"conv_norm_out\.", "norm_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
)


def tiny_swap_vae(seed: int, scaling_factor: float, latent_channels: int = 4):
    """A tiny AutoencoderKL with 32-group norms (as every SD-family VAE), random weights from SEED."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=32, sample_size=64, scaling_factor=scaling_factor,
    )  # fmt: skip
    with torch.no_grad():  # a visible difference from the model's own VAE, and not a flat image
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.eval()


def ldm_vae_weights(vae, prefix: str = "first_stage_model.") -> dict:
    """VAE's state dict in the original LDM layout (attention projections as 1x1 convolutions), keys under PREFIX."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        new = key
        up = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", key)
        if up:
            block, kind, index, rest = up.groups()
            level = levels - 1 - int(block)
            new = f"decoder.up.{level}." + (f"block.{index}.{rest}" if kind == "resnets" else f"upsample.{rest}")
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", new):
            value = value[:, :, None, None]
        out[prefix + new] = value.detach().clone().contiguous()
    return out


def write_vae_files(vae, folder) -> dict:
    """{kind: path}: VAE as a diffusers folder, an LDM .safetensors and an LDM .pt under FOLDER."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(folder / "swap-diffusers")
    weights = ldm_vae_weights(vae)
    save_file(weights, str(folder / "swap.safetensors"))
    torch.save({"state_dict": weights}, folder / "swap.vae.pt")
    return {"diffusers": folder / "swap-diffusers", "safetensors": folder / "swap.safetensors",
            "pt": folder / "swap.vae.pt"}  # fmt: skip
