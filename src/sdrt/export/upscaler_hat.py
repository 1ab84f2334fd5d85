"""HAT (Chen et al. 2023, "Activating More Pixels in Image Super-Resolution Transformer") as a torch module for
export only, in the official repository's state-dict layout (XPixelGroup/HAT: HAT-S, HAT, HAT-L, Real_HAT_GAN).

SwinIR's skeleton (upscaler_swinir.py: windows, shifted-window masks from the input size, residual groups, the
pixel-shuffle upsampler) with hybrid attention blocks (window attention plus a channel-attention conv branch
scaled by 0.01, both on the block's normed input) and, closing each group, an overlapping cross-attention block:
queries from each window, keys and values from a larger window around it (unfolded with padding), a learned bias
per (query, key) offset. The relative position indices are rebuilt as the official code computes them (its
cross-attention index has negative entries, which index from the end of the table, as torch and ONNX Gather do).
"""

import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from sdrt.export.upscaler_swinir import RGB_MEAN, WindowAttention, _partition, _reverse, shift_mask

CONV_SCALE = 0.01  # the channel-attention branch's weight (every published HAT config; not in the state dict)
BUFFERS = re.compile(r"^relative_position_index_(SA|OCA)$")  # rebuilt, not loaded


@dataclass(frozen=True)
class HATArch:
    scale: int
    in_channels: int
    embed_dim: int
    depths: tuple[int, ...]
    heads: tuple[int, ...]
    window: int
    overlap_window: int  # the cross-attention's key window (window * (1 + overlap_ratio))
    mlp_hidden: int
    cab_hidden: int  # the conv branch's narrow width (embed_dim // compress_ratio)
    squeeze: int  # its channel attention's width (embed_dim // squeeze_factor)
    num_feat: int = 64
    conv_after: bool = True  # "1conv" residual connection (else identity)
    patch_norm: bool = True
    name: str = "HAT"

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def blocks(self) -> int:
        return sum(self.depths)

    @property
    def features(self) -> int:
        return self.embed_dim


def cross_index(window: int, outer: int) -> torch.Tensor:
    """(ws*ws, ow*ow) index into the (ws + ow - 1)^2 bias table of each (query, key) pair, as HAT computes it, its
    negative entries taken modulo the table size (where torch's indexing lands)."""
    inner = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    ext = torch.stack(torch.meshgrid(torch.arange(outer), torch.arange(outer), indexing="ij")).flatten(1)
    rel = (ext[:, None, :] - inner[:, :, None]).permute(1, 2, 0) + (window - outer + 1)  # (ws*ws, ow*ow, 2)
    side = window + outer - 1
    return (rel[..., 0] * side + rel[..., 1]) % (side * side)


class ChannelAttentionConv(nn.Module):
    """conv 3x3 -> GELU -> conv 3x3, times a sigmoid gate of its global average (RCAN's channel attention)."""

    def __init__(self, dim: int, hidden: int, squeeze: int):
        super().__init__()
        gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, squeeze, 1), nn.ReLU(), nn.Conv2d(squeeze, dim, 1),
                             nn.Sigmoid())  # fmt: skip
        self.cab = nn.Sequential(nn.Conv2d(dim, hidden, 3, 1, 1), nn.GELU(), nn.Conv2d(hidden, dim, 3, 1, 1))
        self.cab.append(nn.Module())
        self.cab[3].attention = gate  # the official names: cab.3.attention.{1,3}

    def forward(self, x):
        y = self.cab[2](self.cab[1](self.cab[0](x)))
        return y * self.cab[3].attention(y)


def _mlp(dim: int, hidden: int) -> nn.Module:
    mlp = nn.Sequential()
    mlp.fc1, mlp.act, mlp.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
    return mlp


class HybridBlock(nn.Module):
    def __init__(self, arch: HATArch, heads: int, shift: int):
        super().__init__()
        dim, self.window, self.shift = arch.embed_dim, arch.window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, arch.window, heads)
        self.conv_block = ChannelAttentionConv(dim, arch.cab_hidden, arch.squeeze)
        self.mlp = _mlp(dim, arch.mlp_hidden)

    def forward(self, x, h, w):  # x (B, H*W, C)
        c = x.shape[2]
        y = self.norm1(x).reshape(-1, h, w, c)
        conv = self.conv_block(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(-1, h * w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        mask = shift_mask(h, w, self.window, self.shift) if self.shift else None
        y = _reverse(self.attn(_partition(y, self.window), mask), self.window, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(-1, h * w, c) + conv * CONV_SCALE
        return x + self.mlp(self.norm2(x))


class OverlapCrossAttention(nn.Module):
    def __init__(self, arch: HATArch, heads: int):
        super().__init__()
        dim, self.window, self.outer, self.heads = arch.embed_dim, arch.window, arch.overlap_window, heads
        self.scale = (dim // heads) ** -0.5
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        side = arch.window + arch.overlap_window - 1
        self.relative_position_bias_table = nn.Parameter(torch.zeros(side * side, heads))
        self.register_buffer("index", cross_index(arch.window, arch.overlap_window), persistent=False)
        self.proj = nn.Linear(dim, dim)
        self.mlp = _mlp(dim, arch.mlp_hidden)

    def forward(self, x, h, w):  # x (B, H*W, C)
        c, ws, ow, heads = x.shape[2], self.window, self.outer, self.heads
        qkv = self.qkv(self.norm1(x)).reshape(-1, h, w, 3, c)
        q = _partition(qkv[:, :, :, 0], ws)  # (B*nW, ws*ws, C)
        kv = torch.cat((qkv[:, :, :, 1], qkv[:, :, :, 2]), dim=3).permute(0, 3, 1, 2)  # (B, 2C, H, W)
        kv = F.unfold(kv, kernel_size=ow, stride=ws, padding=(ow - ws) // 2)  # (B, 2C * ow * ow, nW)
        kv = kv.reshape(-1, 2, c, ow * ow, kv.shape[-1]).permute(1, 0, 4, 3, 2).reshape(2, -1, ow * ow, c)
        d = c // heads
        q = q.reshape(-1, ws * ws, heads, d).transpose(1, 2) * self.scale  # (B*nW, heads, ws*ws, d)
        k, v = (t.reshape(-1, ow * ow, heads, d).transpose(1, 2) for t in (kv[0], kv[1]))
        bias = self.relative_position_bias_table[self.index.reshape(-1)].reshape(ws * ws, ow * ow, -1)
        attn = (q @ k.transpose(-2, -1) + bias.permute(2, 0, 1)[None]).softmax(dim=-1)
        y = _reverse((attn @ v).transpose(1, 2).reshape(-1, ws * ws, c), ws, h, w).reshape(-1, h * w, c)
        x = self.proj(y) + x
        return x + self.mlp(self.norm2(x))


class HybridGroup(nn.Module):
    """Residual hybrid attention group: hybrid blocks, the overlapping cross-attention, a conv, plus the input."""

    def __init__(self, arch: HATArch, depth: int, heads: int):
        super().__init__()
        dim, ws = arch.embed_dim, arch.window
        self.residual_group = nn.Module()
        self.residual_group.blocks = nn.ModuleList(HybridBlock(arch, heads, ws // 2 if i % 2 else 0)
                                                   for i in range(depth))  # fmt: skip
        self.residual_group.overlap_attn = OverlapCrossAttention(arch, heads)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1) if arch.conv_after else nn.Identity()

    def forward(self, x, h, w):  # (B, H*W, C)
        y = x
        for block in self.residual_group.blocks:
            y = block(y, h, w)
        y = self.residual_group.overlap_attn(y, h, w)
        y = self.conv(y.transpose(1, 2).reshape(-1, x.shape[2], h, w))
        return y.flatten(2).transpose(1, 2) + x


class HAT(nn.Module):
    """(B, C, H, W) in [0, 1], H and W multiples of the window -> (B, C, H * scale, W * scale)."""

    def __init__(self, arch: HATArch):
        super().__init__()
        self.arch = arch
        dim, nf = arch.embed_dim, arch.num_feat
        mean = RGB_MEAN if arch.in_channels == 3 else (0.0,) * arch.in_channels
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(arch.in_channels, dim, 3, 1, 1)
        self.patch_embed = nn.Module()
        self.patch_embed.norm = nn.LayerNorm(dim) if arch.patch_norm else nn.Identity()
        self.layers = nn.ModuleList(HybridGroup(arch, d, h) for d, h in zip(arch.depths, arch.heads, strict=True))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = nn.Conv2d(dim, dim, 3, 1, 1) if arch.conv_after else nn.Identity()
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, nf, 3, 1, 1), nn.LeakyReLU(inplace=True))
        layers = [nn.Conv2d(nf, 9 * nf, 3, 1, 1), nn.PixelShuffle(3)] if arch.scale == 3 else []
        for _ in range(int(math.log2(arch.scale)) if arch.scale != 3 else 0):
            layers += [nn.Conv2d(nf, 4 * nf, 3, 1, 1), nn.PixelShuffle(2)]
        self.upsample = nn.Sequential(*layers)
        self.conv_last = nn.Conv2d(nf, arch.in_channels, 3, 1, 1)

    def forward(self, x):
        x = self.conv_first(x - self.mean)
        h, w = x.shape[2], x.shape[3]
        y = self.patch_embed.norm(x.flatten(2).transpose(1, 2))
        for layer in self.layers:
            y = layer(y, h, w)
        y = self.conv_after_body(self.norm(y).transpose(1, 2).reshape(-1, x.shape[1], h, w)) + x
        return self.conv_last(self.upsample(self.conv_before_upsample(y))) + self.mean


def detect(state: dict) -> tuple[HATArch, dict] | None:
    """(the HAT architecture, its loadable tensors) of a HAT state dict, or None."""
    if "relative_position_index_SA" not in state or "layers.0.residual_group.overlap_attn.qkv.weight" not in state:
        return None
    if "absolute_pos_embed" in state:
        raise ValueError("HAT with absolute position embeddings (a fixed input size) is not supported")
    layers = 1 + _last_index(state, r"^layers\.(\d+)\.")
    depths = tuple(1 + _last_index(state, rf"^layers\.{i}\.residual_group\.blocks\.(\d+)\.") for i in range(layers))
    tables = [state[f"layers.{i}.residual_group.overlap_attn.relative_position_bias_table"] for i in range(layers)]
    first, last = state["conv_first.weight"], state["conv_last.weight"]  # (dim, C, 3, 3), (C, nf, 3, 3)
    nf = int(last.shape[1])
    ups = [v for k, v in state.items() if re.fullmatch(r"upsample\.\d+\.weight", k)]
    block = "layers.0.residual_group.blocks.0."
    arch = HATArch(
        scale=3 if ups[0].shape[0] == 9 * nf else 2 ** len(ups), in_channels=int(first.shape[1]),
        embed_dim=int(first.shape[0]), depths=depths, heads=tuple(int(t.shape[1]) for t in tables),
        window=round(math.sqrt(state["relative_position_index_SA"].shape[0])),
        overlap_window=round(math.sqrt(state["relative_position_index_OCA"].shape[1])),
        mlp_hidden=int(state[block + "mlp.fc1.weight"].shape[0]),
        cab_hidden=int(state[block + "conv_block.cab.0.weight"].shape[0]),
        squeeze=int(state[block + "conv_block.cab.3.attention.1.weight"].shape[0]), num_feat=nf,
        conv_after="conv_after_body.weight" in state, patch_norm="patch_embed.norm.weight" in state,
    )  # fmt: skip
    return arch, {k: v for k, v in state.items() if not BUFFERS.match(k)}


def _last_index(state: dict, pattern: str) -> int:
    return max(int(m.group(1)) for k in state if (m := re.match(pattern, k)))
