"""Swin2SR (Conde et al. 2022, "Swin2SR: SwinV2 Transformer for Compressed Image Super-Resolution and Restoration")
as a torch module for export only, in the official repository's state-dict layout (mv-lab/swin2sr).

SwinIR's network (upscaler_swinir.py: windows, shifted-window masks computed from the input size, residual groups,
the same upsamplers) with SwinV2's blocks: scaled cosine attention (a learned per-head logit scale, clamped at
log 100), a continuous relative position bias (a 2 -> 512 -> heads MLP over log-spaced window offsets, 16 *
sigmoid), a key without bias, norms after the attention and the MLP (post-norm residuals), and a 1x1 `proj` conv in
each patch embedding. Upsamplers: pixelshuffle, pixelshuffledirect, nearest+conv (x4), pixelshuffle_aux (the
compressed-input x4 models: a bicubic branch) and none (JPEG artifact removal: pixel range 0-255 there).
"""

import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from sdrt.export.upscaler_swinir import LRELU_SLOPE, RGB_MEAN, SwinArch, _conv_block, _partition, _reverse, shift_mask

MAX_LOGIT_SCALE = math.log(100.0)  # SwinV2's clamp of the cosine attention's scale
BIAS_RANGE = 16.0  # the continuous position bias: 16 * sigmoid(mlp(...))
CPB_HIDDEN = 512
BUFFERS = re.compile(r".*\.(attn_mask|relative_position_index|relative_coords_table)$")  # rebuilt, not loaded
UNSUPPORTED = {"conv_after_body_hf.weight": "the pixelshuffle_hf upsampler", "absolute_pos_embed": "absolute "
               "position embeddings (a fixed input size)"}  # fmt: skip


@dataclass(frozen=True)
class Swin2Arch(SwinArch):
    img_range: float = 1.0  # inputs scaled to [0, img_range] after the mean is taken off
    qkv_bias: bool = True  # q_bias and v_bias parameters (the key has none)


def coords_table(window: int) -> torch.Tensor:
    """(1, 2w-1, 2w-1, 2): each window offset, scaled to [-8, 8] and log-spaced, as SwinV2's bias MLP reads it."""
    offsets = torch.arange(-(window - 1), window, dtype=torch.float32) / (window - 1) * 8
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1)[None]
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


class CosineWindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.logit_scale = nn.Parameter(torch.full((heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, CPB_HIDDEN), nn.ReLU(), nn.Linear(CPB_HIDDEN, heads, bias=False))
        self.register_buffer("relative_coords_table", coords_table(window), persistent=False)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (N, N, 2)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):  # x (B_, N, C); mask (nW, N, N) or None
        n, c = x.shape[1], x.shape[2]
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)  # (B_, heads, N, N)
        attn = attn * torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()
        table = self.cpb_mlp(self.relative_coords_table).reshape(-1, self.heads)
        position = table[self.relative_position_index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)
        attn = attn + BIAS_RANGE * torch.sigmoid(position)[None]
        if mask is not None:
            windows = mask.shape[0]
            attn = (attn.reshape(-1, windows, self.heads, n, n) + mask[None, :, None]).reshape(-1, self.heads, n, n)
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(-1, n, c))


class PostNormBlock(nn.Module):
    """SwinV2's block: x + norm1(window attention(x)), then + norm2(mlp(.))."""

    def __init__(self, arch: Swin2Arch, heads: int, shift: int):
        super().__init__()
        dim, self.window, self.shift = arch.embed_dim, arch.window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CosineWindowAttention(dim, arch.window, heads, arch.qkv_bias)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act = nn.Linear(dim, arch.mlp_hidden), nn.GELU()
        self.mlp.fc2 = nn.Linear(arch.mlp_hidden, dim)

    def forward(self, x, h, w):  # x (B, H*W, C)
        c = x.shape[2]
        y = x.reshape(-1, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        mask = shift_mask(h, w, self.window, self.shift) if self.shift else None
        y = _reverse(self.attn(_partition(y, self.window), mask), self.window, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.norm1(y.reshape(-1, h * w, c))
        return x + self.norm2(self.mlp(x))


class Swin2Group(nn.Module):
    """Residual Swin transformer block: SwinV2 blocks, a conv on the unflattened map, a 1x1 proj, plus the input."""

    def __init__(self, arch: Swin2Arch, depth: int, heads: int):
        super().__init__()
        dim, ws = arch.embed_dim, arch.window
        self.residual_group = nn.Module()
        self.residual_group.blocks = nn.ModuleList(
            PostNormBlock(arch, heads, ws // 2 if (i % 2 and arch.shift) else 0) for i in range(depth)
        )
        self.conv = _conv_block(dim, arch.resi_connection)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x, h, w):  # (B, H*W, C)
        y = x
        for block in self.residual_group.blocks:
            y = block(y, h, w)
        y = self.patch_embed.proj(self.conv(y.transpose(1, 2).reshape(-1, x.shape[2], h, w)))
        return y.flatten(2).transpose(1, 2) + x


class Swin2SR(nn.Module):
    """(B, C, H, W) in [0, 1], H and W multiples of the window -> (B, C, H * scale, W * scale)."""

    def __init__(self, arch: Swin2Arch):
        super().__init__()
        self.arch = arch
        dim, nf, out = arch.embed_dim, arch.num_feat, arch.out_channels
        mean = RGB_MEAN if arch.in_channels == 3 else (0.0,) * arch.in_channels
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(arch.in_channels, dim, 3, 1, 1)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(dim, dim, 1)
        self.patch_embed.norm = nn.LayerNorm(dim) if arch.patch_norm else nn.Identity()
        self.layers = nn.ModuleList(Swin2Group(arch, d, h) for d, h in zip(arch.depths, arch.heads, strict=True))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = _conv_block(dim, arch.resi_connection)
        kind = arch.upsampler
        if kind in ("pixelshuffle", "pixelshuffle_aux", "nearest+conv"):
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, nf, 3, 1, 1), nn.LeakyReLU(inplace=True))
        if kind in ("pixelshuffle", "pixelshuffle_aux"):
            layers = [nn.Conv2d(nf, 9 * nf, 3, 1, 1), nn.PixelShuffle(3)] if arch.scale == 3 else []
            for _ in range(int(math.log2(arch.scale)) if arch.scale != 3 else 0):
                layers += [nn.Conv2d(nf, 4 * nf, 3, 1, 1), nn.PixelShuffle(2)]
            self.upsample = nn.Sequential(*layers)
            self.conv_last = nn.Conv2d(nf, out, 3, 1, 1)
        if kind == "pixelshuffle_aux":
            self.conv_bicubic = nn.Conv2d(arch.in_channels, nf, 3, 1, 1)
            self.conv_aux = nn.Conv2d(nf, out, 3, 1, 1)
            self.conv_after_aux = nn.Sequential(nn.Conv2d(out, nf, 3, 1, 1), nn.LeakyReLU(inplace=True))
        elif kind == "pixelshuffledirect":
            self.upsample = nn.Sequential(nn.Conv2d(dim, out * arch.scale**2, 3, 1, 1), nn.PixelShuffle(arch.scale))
        elif kind == "nearest+conv":
            self.conv_up1, self.conv_up2 = nn.Conv2d(nf, nf, 3, 1, 1), nn.Conv2d(nf, nf, 3, 1, 1)
            self.conv_hr, self.conv_last = nn.Conv2d(nf, nf, 3, 1, 1), nn.Conv2d(nf, out, 3, 1, 1)
        elif kind == "":
            self.conv_last = nn.Conv2d(dim, out, 3, 1, 1)

    def deep(self, x):  # conv_first's (B, C, H, W) -> the body's output plus its input
        h, w = x.shape[2], x.shape[3]
        y = self.patch_embed.norm(self.patch_embed.proj(x).flatten(2).transpose(1, 2))
        for layer in self.layers:
            y = layer(y, h, w)
        y = self.norm(y).transpose(1, 2).reshape(-1, x.shape[1], h, w)
        return self.conv_after_body(y) + x

    def forward(self, x):
        x = (x - self.mean) * self.arch.img_range
        kind = self.arch.upsampler
        if kind == "":
            x = x + self.conv_last(self.deep(self.conv_first(x)))
        elif kind == "pixelshuffledirect":
            x = self.upsample(self.deep(self.conv_first(x)))
        elif kind == "pixelshuffle":
            x = self.conv_last(self.upsample(self.conv_before_upsample(self.deep(self.conv_first(x)))))
        elif kind == "pixelshuffle_aux":
            bicubic = F.interpolate(x, scale_factor=float(self.arch.scale), mode="bicubic", align_corners=False)
            y = self.conv_after_aux(self.conv_aux(self.conv_before_upsample(self.deep(self.conv_first(x)))))
            x = self.conv_last(self.upsample(y) + self.conv_bicubic(bicubic))
        else:  # nearest+conv, x4
            y = self.conv_before_upsample(self.deep(self.conv_first(x)))
            y = F.leaky_relu(self.conv_up1(F.interpolate(y, scale_factor=2.0, mode="nearest")), LRELU_SLOPE)
            y = F.leaky_relu(self.conv_up2(F.interpolate(y, scale_factor=2.0, mode="nearest")), LRELU_SLOPE)
            x = self.conv_last(F.leaky_relu(self.conv_hr(y), LRELU_SLOPE))
        return x / self.arch.img_range + self.mean


def detect(state: dict) -> tuple[Swin2Arch, dict] | None:
    """(the Swin2SR architecture, its loadable tensors) of a Swin2SR state dict, or None; ValueError for a Swin2SR
    file of a kind sdrt does not export."""
    if "conv_first.weight" not in state or "layers.0.residual_group.blocks.0.attn.logit_scale" not in state:
        return None
    for key, what in UNSUPPORTED.items():
        if key in state:
            raise ValueError(f"Swin2SR with {what} is not supported")
    layers = 1 + _last_index(state, r"^layers\.(\d+)\.")
    depths = tuple(1 + _last_index(state, rf"^layers\.{i}\.residual_group\.blocks\.(\d+)\.") for i in range(layers))
    heads = tuple(int(state[f"layers.{i}.residual_group.blocks.0.attn.logit_scale"].shape[0]) for i in range(layers))
    index = state.get("layers.0.residual_group.blocks.0.attn.relative_position_index")
    table = state.get("layers.0.residual_group.blocks.0.attn.relative_coords_table")
    if index is not None:
        window = round(math.sqrt(index.shape[0]))
    elif table is not None:
        window = (int(table.shape[1]) + 1) // 2
    else:
        raise ValueError("Swin2SR without its relative_position_index buffers: the window size is unknown")
    first = state["conv_first.weight"]  # (embed, C_in, 3, 3)
    dim, in_channels = int(first.shape[0]), int(first.shape[1])
    nf = int(state["conv_before_upsample.0.weight"].shape[0]) if "conv_before_upsample.0.weight" in state else 64
    if "conv_bicubic.weight" in state:
        upsampler = "pixelshuffle_aux"
    elif "conv_hr.weight" in state:
        upsampler = "nearest+conv"
    elif "conv_before_upsample.0.weight" in state:
        upsampler = "pixelshuffle"
    elif "upsample.0.weight" in state:
        upsampler = "pixelshuffledirect"
    else:
        upsampler = ""
    if upsampler in ("pixelshuffle", "pixelshuffle_aux"):
        ups = [v for k, v in state.items() if re.fullmatch(r"upsample\.\d+\.weight", k)]
        scale = 3 if ups[0].shape[0] == 9 * nf else 2 ** len(ups)
    elif upsampler == "pixelshuffledirect":
        scale = round(math.sqrt(state["upsample.0.weight"].shape[0] / in_channels))
    else:
        scale = 4 if upsampler == "nearest+conv" else 1
    arch = Swin2Arch(
        scale=scale, in_channels=in_channels, out_channels=in_channels, embed_dim=dim, depths=depths, heads=heads,
        window=window, mlp_hidden=int(state["layers.0.residual_group.blocks.0.mlp.fc1.weight"].shape[0]),
        upsampler=upsampler, resi_connection="3conv" if "conv_after_body.4.weight" in state else "1conv",
        num_feat=nf, shift="layers.0.residual_group.blocks.1.attn_mask" in state,
        patch_norm="patch_embed.norm.weight" in state, name="Swin2SR", blocks=sum(depths), features=dim,
        img_range=255.0 if window == 7 else 1.0, qkv_bias="layers.0.residual_group.blocks.0.attn.q_bias" in state,
    )  # fmt: skip
    return arch, {k: v for k, v in state.items() if not BUFFERS.match(k)}


def _last_index(state: dict, pattern: str) -> int:
    return max(int(m.group(1)) for k in state if (m := re.match(pattern, k)))
