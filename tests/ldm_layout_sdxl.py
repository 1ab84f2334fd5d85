"""Rename a diffusers SDXL pipeline's state dicts into the original single-file (SGM, generative-models) layout.

The UNet and VAE keys are LDM's (ldm_layout.py), plus SDXL's added-conditioning MLP under label_emb.0. The base's
CLIP ViT-L sits under conditioner.embedders.0.transformer. in transformers' layout, its OpenCLIP bigG under
conditioner.embedders.1.model. in OpenCLIP's own (packed q/k/v, ln_final, a (width, projection) text_projection,
every block used); the refiner holds only the OpenCLIP tower, as conditioner.embedders.0.model.
"""

import torch
from ldm_layout import (
    RESNET_PARTS,
    UNET_PREFIX,
    VAE_ATTENTION_PARTS,
    VAE_PREFIX,
    VAE_RESNET_PARTS,
    _rename,
    open_clip_state_dict,
    unet_prefix_map,
    vae_prefix_map,
)

SGM_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SGM_OPEN_CLIP_PREFIXES = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}
ADDED_EMBEDDING = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}


def sgm_open_clip(text_encoder_2) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection as OpenCLIP's text tower: every block, and the projection (width, proj)."""
    state = open_clip_state_dict(text_encoder_2)
    extra = f"transformer.resblocks.{text_encoder_2.config.num_hidden_layers}."
    state = {k: v for k, v in state.items() if not k.startswith(extra)}  # SD 2's unused last block: not SDXL's
    state["text_projection"] = text_encoder_2.text_projection.weight.detach().T.contiguous()
    return state


def to_sgm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """One flat SGM-layout state dict of an SDXL base (two text encoders) or refiner (text_encoder is None)."""
    out = {}
    unet_map = unet_prefix_map(pipe.unet.config) | ADDED_EMBEDDING
    for k, v in pipe.unet.state_dict().items():
        parts = RESNET_PARTS if ".resnets." in k else {}
        out[UNET_PREFIX + _rename(k, unet_map, parts)] = v.contiguous()
    vae_map = vae_prefix_map(pipe.vae.config)
    for k, v in pipe.vae.state_dict().items():
        parts = VAE_ATTENTION_PARTS if ".attentions." in k else VAE_RESNET_PARTS
        new = _rename(k, vae_map, parts)
        if ".attn_1." in new and v.ndim == 2:
            v = v[:, :, None, None]  # the VAE's attention as 1x1 convolutions
        out[VAE_PREFIX + new] = v.contiguous()
    role = "refiner" if pipe.text_encoder is None else "base"
    if role == "base":
        for k, v in pipe.text_encoder.state_dict().items():
            out[SGM_CLIP_PREFIX + ("" if k.startswith("text_model.") else "text_model.") + k] = v.contiguous()
        # Released SDXL files keep CLIP's position_ids buffer, which transformers 5 no longer saves.
        positions = pipe.text_encoder.config.max_position_embeddings
        out.setdefault(SGM_CLIP_PREFIX + "text_model.embeddings.position_ids", torch.arange(positions)[None])
    prefix = SGM_OPEN_CLIP_PREFIXES[role]
    out |= {prefix + k: v for k, v in sgm_open_clip(pipe.text_encoder_2).items()}
    return out
