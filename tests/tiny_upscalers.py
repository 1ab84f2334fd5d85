"""Tiny random ESRGAN-family upscaler files (each architecture and key layout), written once per test session."""

from dataclasses import replace
from pathlib import Path

import torch

from sdrt.export.upscaler_arch import Arch, build
from sdrt.export.upscaler_hat import HATArch
from sdrt.export.upscaler_swin2sr import Swin2Arch
from sdrt.export.upscaler_swinir import SwinArch

TINY_ARCHS = {
    "rrdb_x4": Arch("ESRGAN", 4, 3, 3, features=8, blocks=2, growth=4),
    "rrdb_x2": Arch("ESRGAN", 2, 3, 3, features=8, blocks=1, growth=4, unshuffle=2),
    "compact_prelu": Arch("RealESRGAN Compact", 4, 3, 3, features=8, blocks=2, activation="prelu"),
    "compact_lrelu": Arch("RealESRGAN Compact", 2, 3, 3, features=8, blocks=3, activation="lrelu"),
    # A1111's SwinIR 4x layout (nearest+conv, 3conv) and the classical x2 one (pixelshuffle, 1conv), tiny
    "swinir_x4": SwinArch(
        4,
        3,
        3,
        embed_dim=16,
        depths=(2, 2),
        heads=(2, 2),
        window=4,
        mlp_hidden=32,
        upsampler="nearest+conv",
        resi_connection="3conv",
        num_feat=8,
        blocks=4,
        features=16,
    ),
    "swinir_x2": SwinArch(
        2,
        3,
        3,
        embed_dim=16,
        depths=(2,),
        heads=(4,),
        window=4,
        mlp_hidden=16,
        upsampler="pixelshuffle",
        resi_connection="1conv",
        num_feat=8,
        blocks=2,
        features=16,
    ),
    # Swin2SR: the classical x2 layout (pixelshuffle), the compressed-input x4 one (pixelshuffle_aux, a bicubic
    # branch), the real-world x4 one (nearest+conv, 3conv) and the JPEG one (no upsampling, window 7, range 255)
    "swin2sr_x2": Swin2Arch(2, 3, 3, embed_dim=16, depths=(2,), heads=(2,), window=4, mlp_hidden=32,
                            upsampler="pixelshuffle", resi_connection="1conv", num_feat=8, name="Swin2SR", blocks=2,
                            features=16),  # fmt: skip
    "swin2sr_aux_x4": Swin2Arch(4, 3, 3, embed_dim=16, depths=(2,), heads=(4,), window=4, mlp_hidden=16,
                                upsampler="pixelshuffle_aux", resi_connection="1conv", num_feat=8, name="Swin2SR",
                                blocks=2, features=16),  # fmt: skip
    "swin2sr_x4": Swin2Arch(4, 3, 3, embed_dim=16, depths=(2, 2), heads=(2, 2), window=4, mlp_hidden=32,
                            upsampler="nearest+conv", resi_connection="3conv", num_feat=8, name="Swin2SR", blocks=4,
                            features=16),  # fmt: skip
    "swin2sr_jpeg": Swin2Arch(1, 3, 3, embed_dim=16, depths=(2,), heads=(2,), window=7, mlp_hidden=32,
                              upsampler="", resi_connection="1conv", name="Swin2SR", blocks=2, features=16,
                              img_range=255.0),  # fmt: skip
    # HAT: x2 and x4 pixelshuffle (overlap ratio 0.5: 6 px key windows around 4 px query windows), x4 with two groups
    "hat_x2": HATArch(2, 3, embed_dim=16, depths=(2,), heads=(2,), window=4, overlap_window=6, mlp_hidden=32,
                      cab_hidden=4, squeeze=2, num_feat=8),  # fmt: skip
    "hat_x4": HATArch(4, 3, embed_dim=16, depths=(2, 2), heads=(4, 2), window=4, overlap_window=6, mlp_hidden=16,
                      cab_hidden=4, squeeze=2, num_feat=8),  # fmt: skip
}
# the size-dependent buffers the official files hold (sdrt rebuilds them): a shifted block's mask (16 px training
# size) and the position index; Swin2SR's also its coordinates table
SWIN_BUFFERS = {"layers.0.residual_group.blocks.1.attn_mask": lambda w: torch.zeros((16 // w) ** 2, w * w, w * w),
                "layers.0.residual_group.blocks.0.attn.relative_position_index": lambda w: torch.zeros(w * w, w * w)}


# The reference check against spandrel (test_upscale_spandrel.py) needs the official layouts: the official code (and
# so spandrel) fixes ESRGAN's growth channels at 32 and SwinIR/Swin2SR's upsampling features at 64 instead of reading
# them from the weights; and spandrel loads no SRVGGNetCompact with LeakyReLU (none was published), so it has none.
OFFICIAL_FIXED = {"ESRGAN": {"growth": 32}, "SwinIR": {"num_feat": 64}, "Swin2SR": {"num_feat": 64}}
REFERENCE_ARCHS = {key: replace(arch, **OFFICIAL_FIXED.get(arch.name, {})) for key, arch in TINY_ARCHS.items()
                   if key != "compact_lrelu"}  # fmt: skip


def tiny_module(key: str, seed: int = 0, archs: dict = TINY_ARCHS) -> torch.nn.Module:
    """The random module of ARCHS[KEY]; weights scaled so outputs span [0, 1] instead of sitting near 0."""
    torch.manual_seed(seed)
    model = build(archs[key]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.3)
    return model


def to_old_layout(state: dict) -> dict:
    """An RRDBNet state dict in the original ESRGAN repository's names (model.0, model.1.sub.N.RDBk.convj.0, ...)."""
    ups = sorted(k.split(".")[0] for k in state if k.startswith("conv_up") and k.endswith("weight"))
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    tops = {"conv_first": 0, **{u: 3 + 3 * i for i, u in enumerate(ups)}}
    tops["conv_hr"] = 3 + 3 * len(ups) - 1
    tops["conv_last"] = tops["conv_hr"] + 2
    old = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "body":
            old[f"model.1.sub.{parts[1]}.RDB{parts[2][-1]}.conv{parts[3][-1]}.0.{parts[4]}"] = value
        elif parts[0] == "conv_body":
            old[f"model.1.sub.{blocks}.{parts[1]}"] = value
        else:
            old[f"model.{tops[parts[0]]}.{parts[1]}"] = value
    return old


def write_tiny_upscalers(folder: Path, archs: dict = TINY_ARCHS) -> dict:
    """{name: file} for each tiny architecture of ARCHS (.pth as BasicSR writes, {"params_ema": ...}), plus the x4
    RRDBNet in the old ESRGAN layout (.pth) and as .safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for key in archs:
        files[key] = folder / f"{key}.pth"
        state = tiny_module(key, archs=archs).state_dict()
        if key.startswith("swin"):
            window = archs[key].window
            state |= {name: make(window) for name, make in SWIN_BUFFERS.items()}
        if key.startswith("hat"):  # the model-level index buffers of the official files (sdrt rebuilds them)
            arch = archs[key]
            state["relative_position_index_SA"] = torch.zeros(arch.window**2, arch.window**2).long()
            state["relative_position_index_OCA"] = torch.zeros(arch.window**2, arch.overlap_window**2).long()
        if key.startswith("swin2sr"):
            side = 2 * archs[key].window - 1
            state["layers.0.residual_group.blocks.0.attn.relative_coords_table"] = torch.zeros(1, side, side, 2)
        torch.save({"params_ema": state}, files[key])
    if "rrdb_x4" not in archs:
        return files
    state = tiny_module("rrdb_x4", archs=archs).state_dict()
    files["rrdb_x4_old"] = folder / "rrdb_x4_old.pth"
    torch.save(to_old_layout(state), files["rrdb_x4_old"])
    files["rrdb_x4_st"] = folder / "rrdb_x4_st.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(files["rrdb_x4_st"]))
    return files
