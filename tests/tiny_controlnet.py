"""Tiny random ControlNets for a tiny UNet, in diffusers format (test fixtures).

`ControlNetModel.from_unet` copies the UNet's encoder and zero-initialises the control image embedding's last
conv and every residual's 1x1 "zero conv" (Zhang et al. 2023, sec. 3.1): such a ControlNet changes nothing. The
builder gives those layers random weights of a size that moves the image by tens of /255, so a parity test on it
can fail.
"""

from pathlib import Path


def build_tiny_controlnet(unet, folder, seed: int = 0, gain: float = 0.3, embedding=(8, 16, 16, 32), groups=None):
    """A ControlNetModel shaped like UNET, saved to FOLDER (diffusers format) and returned (float32, eval).
    EMBEDDING: the control image encoder's channels; EMBEDDING (16, 32, 96, 256) and GROUPS 32 (GroupNorm groups) are
    the published ControlNets', which the conversion from a cldm YAML assumes."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding)
    with torch.no_grad():
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        for conv in [*zero_convs, controlnet.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0.0, gain / conv.weight[0].numel() ** 0.5)
            conv.bias.normal_(0.0, gain * 0.1)
    if groups is not None:
        for module in controlnet.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.num_groups = groups
        controlnet.register_to_config(norm_num_groups=groups)
    controlnet.save_pretrained(Path(folder))
    return ControlNetModel.from_pretrained(Path(folder), torch_dtype=torch.float32).eval()


def to_extension_state_dict(controlnet) -> dict:
    """CONTROLNET's weights in the A1111 extension's single-file layout (control_v11p_sd15_*.pth): the UNet encoder
    under LDM names (ldm_layout.py), zero_convs.N.0, middle_block_out.0 and the hint encoder's convs at
    input_hint_block.0, 2, ..., all under "control_model."."""
    from ldm_layout import RESNET_PARTS, _rename, unet_prefix_map

    state = controlnet.state_dict()
    config = {**controlnet.config, "up_block_types": controlnet.config.down_block_types[::-1]}  # (unused here)
    prefixes = {k: v for k, v in unet_prefix_map(config).items() if not k.startswith(("up_blocks", "conv_"))}
    prefixes["conv_in."] = "input_blocks.0.0."
    prefixes["controlnet_mid_block."] = "middle_block_out.0."
    prefixes["controlnet_cond_embedding.conv_in."] = "input_hint_block.0."
    blocks = len(controlnet.controlnet_cond_embedding.blocks)
    for i in range(blocks):
        prefixes[f"controlnet_cond_embedding.blocks.{i}."] = f"input_hint_block.{2 * (i + 1)}."
    prefixes["controlnet_cond_embedding.conv_out."] = f"input_hint_block.{2 * (blocks + 1)}."
    for i in range(len(controlnet.controlnet_down_blocks)):
        prefixes[f"controlnet_down_blocks.{i}."] = f"zero_convs.{i}.0."
    out = {}
    for key, value in state.items():
        parts = RESNET_PARTS if ".resnets." in key else {}
        out["control_model." + _rename(key, prefixes, parts)] = value.contiguous()
    return out


def cldm_config(pipe) -> dict:
    """The extension's cldm YAML (cldm_v15.yaml's layout) for a ControlNet of PIPE's UNet: the LDM config with a
    control_stage_config."""
    from ldm_layout import original_config

    config = original_config(pipe)
    params = config["model"]["params"]
    unet = params["unet_config"]["params"]
    unet["num_heads"] = unet.pop("num_head_channels")  # SD 1.x YAMLs count heads (diffusers' attention_head_dim)
    params["control_stage_config"] = {
        "target": "cldm.cldm.ControlNet",
        "params": {**params["unet_config"]["params"], "hint_channels": 3},
    }
    return config
