"""Single-file checkpoints of the tiny SD 3.5 / FLUX.1 pipelines, written offline in the original key layouts people
download: SD 3.5's `model.diffusion_model.joint_blocks.*` + `first_stage_model.*` (+ `text_encoders.clip_l/clip_g/
t5xxl.transformer.*`), FLUX.1's `double_blocks.*` / `single_blocks.*` transformer file, and the separate files
ComfyUI keeps (clip_l.safetensors, t5xxl.safetensors in transformers' layout, ae.safetensors in the LDM layout).

The maps below are the inverses of diffusers' single-file converters; `round_trips` checks that diffusers' own
converters give the tiny pipelines' state dicts back exactly, so the files are what diffusers reads.
"""

import re
from pathlib import Path

import torch

LINEAR = (".weight", ".bias")


def _block_count(state: dict, name: str) -> int:
    found = {int(k.split(".")[1]) for k in state if k.startswith(name + ".")}
    return max(found) + 1 if found else 0


def _swap_halves(x):
    a, b = x.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def sd3_transformer_original(state: dict) -> dict:
    """SD3Transformer2DModel's state dict in the original MMDiT layout (convert_sd3_transformer_..._diffusers^-1)."""
    out = {"pos_embed": state["pos_embed.pos_embed"]}
    renames = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
               "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
               "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
               "proj_out": "final_layer.linear"}  # fmt: skip
    for new, old in renames.items():
        for end in LINEAR:
            out[old + end] = state[new + end]
    for end in LINEAR:
        out["final_layer.adaLN_modulation.1" + end] = _swap_halves(state["norm_out.linear" + end])
    layers = _block_count(state, "transformer_blocks")
    for i in range(layers):
        new, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == layers - 1
        for end in LINEAR:
            out[x + "attn.qkv" + end] = torch.cat([state[new + f"attn.to_{p}" + end] for p in "qkv"])
            out[c + "attn.qkv" + end] = torch.cat([state[new + f"attn.add_{p}_proj" + end] for p in "qkv"])
            pairs = {"attn.to_out.0": x + "attn.proj", "norm1.linear": x + "adaLN_modulation.1",
                     "ff.net.0.proj": x + "mlp.fc1", "ff.net.2": x + "mlp.fc2"}  # fmt: skip
            if not last:
                pairs.update({"attn.to_add_out": c + "attn.proj", "norm1_context.linear": c + "adaLN_modulation.1",
                              "ff_context.net.0.proj": c + "mlp.fc1", "ff_context.net.2": c + "mlp.fc2"})  # fmt: skip
            else:
                out[c + "adaLN_modulation.1" + end] = _swap_halves(state[new + "norm1_context.linear" + end])
            for n, o in pairs.items():
                out[o + end] = state[new + n + end]
            if new + "attn2.to_q" + end in state:
                out[x + "attn2.qkv" + end] = torch.cat([state[new + f"attn2.to_{p}" + end] for p in "qkv"])
                out[x + "attn2.proj" + end] = state[new + "attn2.to_out.0" + end]
        norms = {"attn.norm_q": x + "attn.ln_q", "attn.norm_k": x + "attn.ln_k", "attn.norm_added_q": c + "attn.ln_q",
                 "attn.norm_added_k": c + "attn.ln_k", "attn2.norm_q": x + "attn2.ln_q",
                 "attn2.norm_k": x + "attn2.ln_k"}  # fmt: skip
        for n, o in norms.items():
            if new + n + ".weight" in state:
                out[o + ".weight"] = state[new + n + ".weight"]
    return out


def diffusers_to_flux(state: dict) -> dict:
    """sdrt.export.flux_keys.flux_to_diffusers' inverse: FluxTransformer2DModel's state dict in BFL's layout (from
    the product's key table: diffusers' own converter, in round_trips and test_flow_single_file, judges it)."""
    from sdrt.export.flux_keys import DOUBLE_QKV, renamed_keys

    double, single = _block_count(state, "transformer_blocks"), _block_count(state, "single_transformer_blocks")
    guidance = "time_text_embed.guidance_embedder.linear_1.weight" in state
    out = {old: state[new] for new, old in renamed_keys(double, single, guidance)}
    for end in LINEAR:
        scale, shift = state["norm_out.linear" + end].chunk(2, dim=0)
        out["final_layer.adaLN_modulation.1" + end] = torch.cat([shift, scale], dim=0)
    for i in range(double):
        old, new = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for o, names in DOUBLE_QKV.items():
            for end in LINEAR:
                out[old + o + end] = torch.cat([state[new + n + end] for n in names], dim=0)
    for i in range(single):
        old, new = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for end in LINEAR:
            parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            out[old + "linear1" + end] = torch.cat([state[new + p + end] for p in parts], dim=0)
    return out


def vae_ldm(state: dict) -> dict:
    """AutoencoderKL's state dict in the original LDM layout (convert_ldm_vae_checkpoint^-1; 1x1 conv attention)."""
    ups = _block_count({k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.up_blocks")},
                       "up_blocks")  # fmt: skip
    out = {}
    for key, value in state.items():
        old = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        old = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", old)
        old = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", old)
        old = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{ups - 1 - int(m[1])}.block.", old)
        old = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{ups - 1 - int(m[1])}.upsample.", old)
        old = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", old)
        if "mid_block.attentions.0." in old:
            old = old.replace("mid_block.attentions.0.", "mid.attn_1.")
            for n, o in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                old = old.replace(f".{n}.", f".{o}.")
            if value.ndim == 2:
                value = value[:, :, None, None]
        out[old] = value
    return out


def text_model_keys(state: dict) -> dict:
    """A CLIP text model's keys as transformers' files name them (with text_model.; recent transformers' flat
    CLIPTextModel drops that level)."""
    top = ("text_projection.", "text_model.")
    return {k if k.startswith(top) else "text_model." + k: v for k, v in state.items()}


def t5_file_keys(state: dict) -> dict:
    """T5EncoderModel's keys as t5xxl files hold them: the tied embedding once, as shared.weight."""
    return {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}


def _save(tensors: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path))
    return path


def write_sd3_file(pipe, path: Path, clips: bool = True, t5: bool = False) -> Path:
    """PIPE (a StableDiffusion3Pipeline) as one file: transformer, VAE, CLIP-L and bigG if CLIPS, T5 if T5."""
    tensors = {
        "model.diffusion_model." + k: v for k, v in sd3_transformer_original(pipe.transformer.state_dict()).items()
    }
    tensors.update({"first_stage_model." + k: v for k, v in vae_ldm(pipe.vae.state_dict()).items()})
    if clips:
        for name, encoder in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
            prefix = f"text_encoders.{name}.transformer."
            tensors.update({prefix + k: v for k, v in text_model_keys(encoder.state_dict()).items()})
    if t5:
        prefix = "text_encoders.t5xxl.transformer."
        tensors.update({prefix + k: v for k, v in t5_file_keys(pipe.text_encoder_3.state_dict()).items()})
    return _save(tensors, path)


def write_flux_files(pipe, folder: Path, prefixed: bool = True) -> dict:
    """PIPE (a FluxPipeline) as ComfyUI keeps it: {"transformer", "clip_l", "t5xxl", "vae"} file paths."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "model.diffusion_model." if prefixed else ""
    original = diffusers_to_flux(pipe.transformer.state_dict())
    return {
        "transformer": _save({prefix + k: v for k, v in original.items()}, folder / "flux1-tiny.safetensors"),
        "clip_l": _save(text_model_keys(pipe.text_encoder.state_dict()), folder / "clip_l.safetensors"),
        "t5xxl": _save(t5_file_keys(pipe.text_encoder_2.state_dict()), folder / "t5xxl.safetensors"),
        "vae": _save(vae_ldm(pipe.vae.state_dict()), folder / "ae.safetensors"),
    }


def round_trips(pipe) -> dict:
    """{part: max |difference|} between PIPE's state dicts and diffusers' converters applied to the files' layouts
    (KeyError/AssertionError if a key is missing or extra)."""
    from diffusers.loaders import single_file_utils as sfu

    out = {}
    if hasattr(pipe, "text_encoder_3"):
        state = pipe.transformer.state_dict()
        back = sfu.convert_sd3_transformer_checkpoint_to_diffusers(
            {"model.diffusion_model." + k: v for k, v in sd3_transformer_original(state).items()}
        )
        out["transformer"] = _compare(state, back)
    vae = pipe.vae.state_dict()
    back = sfu.convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in vae_ldm(vae).items()},
                                          dict(pipe.vae.config))  # fmt: skip
    out["vae"] = _compare(vae, back)
    return out


def _compare(state: dict, back: dict) -> float:
    assert set(state) == set(back), (sorted(set(state) ^ set(back)))[:5]
    return max(float((state[k].float() - back[k].float()).abs().max()) for k in state)
