"""FLUX.1's original checkpoint layout (Black Forest Labs' `flux1-dev.safetensors`: `double_blocks.*`,
`single_blocks.*`, optionally under `model.diffusion_model.`) -> diffusers' FluxTransformer2DModel keys.

diffusers' own converter (single_file_utils.convert_flux_transformer_checkpoint_to_diffusers) fixes the model width
at FLUX.1's 3072; this one reads the width from the file, so the tests' tiny FLUX converts too. tests/
test_flow_single_file.py checks both give the same tensors, row for row, on every key at FLUX.1's real width.
Run on lazy_weights' placeholders, each converted tensor records the slices it takes.
"""

import torch

PREFIX = "model.diffusion_model."
LINEAR = (".weight", ".bias")
EMBEDDERS = {  # diffusers module -> original module (weight and bias each)
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
}
GUIDANCE_EMBEDDER = {  # FLUX.1 dev's files only
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
DOUBLE_LINEARS = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
              "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}  # fmt: skip
SINGLE_LINEARS = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
BLOCKS = (  # (original block name, diffusers block name, their linears, their RMS norms)
    ("double_blocks", "transformer_blocks", DOUBLE_LINEARS, DOUBLE_NORMS),
    ("single_blocks", "single_transformer_blocks", SINGLE_LINEARS, SINGLE_NORMS),
)


def _blocks(checkpoint: dict, name: str) -> int:
    """How many NAME.<i>. blocks the checkpoint holds."""
    found = {int(k.split(".")[1]) for k in checkpoint if k.startswith(name + ".")}
    return max(found) + 1 if found else 0


def renamed_keys(double: int, single: int, guidance: bool) -> list[tuple[str, str]]:
    """(diffusers key, original key) of every tensor that only changes its name: the embedders' linears (the
    guidance embedder's where GUIDANCE), and in DOUBLE double and SINGLE single blocks their linears and RMS norms
    (the original's `scale` is diffusers' `weight`). Both directions use it (tests/single_files.py writes files)."""
    embedders = {**EMBEDDERS, **(GUIDANCE_EMBEDDER if guidance else {})}
    pairs = [(new + end, old + end) for new, old in embedders.items() for end in LINEAR]
    for (old_name, new_name, linears, norms), count in zip(BLOCKS, (double, single), strict=True):
        for i in range(count):
            old, new = f"{old_name}.{i}.", f"{new_name}.{i}."
            pairs += [(new + n + end, old + o + end) for n, o in linears.items() for end in LINEAR]
            pairs += [(new + n + ".weight", old + o + ".scale") for n, o in norms.items()]
    return pairs


def flux_to_diffusers(checkpoint: dict) -> dict:
    """{diffusers key: tensor} from an original-layout FLUX.1 transformer state dict."""
    ck = {k.removeprefix(PREFIX): v for k, v in checkpoint.items()}
    double, single = _blocks(ck, "double_blocks"), _blocks(ck, "single_blocks")
    out = {new: ck[old] for new, old in renamed_keys(double, single, "guidance_in.in_layer.weight" in ck)}
    for end in LINEAR:  # the final AdaLN: the original is (shift, scale), diffusers' (scale, shift)
        shift, scale = ck["final_layer.adaLN_modulation.1" + end].chunk(2, dim=0)
        out["norm_out.linear" + end] = torch.cat([scale, shift], dim=0)
    width = ck["img_in.weight"].shape[0]
    for i in range(double):
        old, new = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for o, names in DOUBLE_QKV.items():
            for end in LINEAR:
                for n, part in zip(names, ck[old + o + end].chunk(3, dim=0), strict=True):
                    out[new + n + end] = part
    for i in range(single):
        old, new = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for end in LINEAR:  # linear1 = [q; k; v; mlp in]
            fused = ck[old + "linear1" + end]
            sizes = (width, width, width, fused.shape[0] - 3 * width)
            q, k, v, mlp = torch.split(fused, sizes, dim=0)
            out.update({new + "attn.to_q" + end: q, new + "attn.to_k" + end: k, new + "attn.to_v" + end: v,
                        new + "proj_mlp" + end: mlp})  # fmt: skip
    return out
