"""SwinIR (Liang et al. 2021, "SwinIR: Image Restoration Using Swin Transformer") as a torch module for export only,
in the official repository's state-dict layout (A1111's "SwinIR 4x" is its real-world x4 GAN model, SwinIR-M).

Written for a graph with dynamic height and width: the shifted windows' attention mask is computed from the input
size with arange arithmetic (no in-place slice assignment), window reshapes use -1 for the batch. Input sides must
be multiples of the window size (the runtime pads, `size_multiple` in upscaler.json).
"""

import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K's mean, subtracted by SwinIR for 3-channel models
MASKED = -100.0  # SwinIR's attention mask value between windows' different regions
LRELU_SLOPE = 0.2


@dataclass(frozen=True)
class SwinArch:
    scale: int
    in_channels: int
    out_channels: int
    embed_dim: int
    depths: tuple[int, ...]
    heads: tuple[int, ...]
    window: int
    mlp_hidden: int
    upsampler: str  # "nearest+conv", "pixelshuffle", "pixelshuffledirect", "" (same size)
    resi_connection: str  # "1conv" or "3conv"
    num_feat: int = 64
    shift: bool = True  # the training size was larger than one window: odd blocks shift
    patch_norm: bool = True
    name: str = "SwinIR"
    blocks: int = 0  # for the manifest: total Swin blocks
    features: int = 0


def _conv_block(dim: int, kind: str) -> nn.Module:
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(LRELU_SLOPE), nn.Conv2d(dim // 4, dim // 4, 1),
                         nn.LeakyReLU(LRELU_SLOPE), nn.Conv2d(dim // 4, dim, 3, 1, 1))  # fmt: skip


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ws x ws windows with a learned relative position bias."""

    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.window, self.heads = window, heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (N, N, 2)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):  # x (B_, N, C); mask (nW, N, N) or None
        n, c = x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)  # (B_, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)].reshape(n, n, -1)
        attn = attn + bias.permute(2, 0, 1)[None]
        if mask is not None:
            windows = mask.shape[0]
            attn = (attn.reshape(-1, windows, self.heads, n, n) + mask[None, :, None]).reshape(-1, self.heads, n, n)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(-1, n, c)
        return self.proj(x)


def _partition(x, ws):  # (B, H, W, C) -> (B * nW, ws * ws, C)
    b, h, w, c = x.shape
    return x.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _reverse(windows, ws, h, w):  # (B * nW, ws * ws, C) -> (B, H, W, C)
    c = windows.shape[-1]
    return windows.reshape(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shift_mask(h, w, ws: int, shift: int):
    """SwinIR's calculate_mask for an H x W map: (nW, ws*ws, ws*ws) of 0 within a region, -100 across regions.
    Regions (3 x 3): rows [0, H-ws), [H-ws, H-shift), [H-shift, H), the same for columns."""
    rows = (torch.arange(h) >= h - ws).long() + (torch.arange(h) >= h - shift).long()
    cols = (torch.arange(w) >= w - ws).long() + (torch.arange(w) >= w - shift).long()
    region = (rows[:, None] * 3 + cols[None, :]).float()[None, :, :, None]  # (1, H, W, 1)
    windows = _partition(region, ws)[..., 0]  # (nW, ws*ws)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, torch.full_like(diff, MASKED), torch.zeros_like(diff))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, hidden: int):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x, h, w):  # x (B, H*W, C)
        c = x.shape[2]
        y = self.norm1(x).reshape(-1, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        mask = shift_mask(h, w, self.window, self.shift) if self.shift else None
        y = _reverse(self.attn(_partition(y, self.window), mask), self.window, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(-1, h * w, c)
        return x + self.mlp(self.norm2(x))


class RSTB(nn.Module):
    """Residual Swin Transformer block: Swin blocks, then a conv on the unflattened map, plus the input."""

    def __init__(self, arch: SwinArch, depth: int, heads: int):
        super().__init__()
        dim, ws = arch.embed_dim, arch.window
        self.residual_group = nn.Module()
        self.residual_group.blocks = nn.ModuleList(
            SwinBlock(dim, heads, ws, ws // 2 if (i % 2 and arch.shift) else 0, arch.mlp_hidden) for i in range(depth)
        )
        self.conv = _conv_block(dim, arch.resi_connection)

    def forward(self, x, h, w):  # (B, H*W, C)
        y = x
        for block in self.residual_group.blocks:
            y = block(y, h, w)
        y = self.conv(y.transpose(1, 2).reshape(-1, x.shape[2], h, w))
        return y.flatten(2).transpose(1, 2) + x


class SwinIR(nn.Module):
    """(B, C, H, W) in [0, 1], H and W multiples of the window -> (B, C_out, H * scale, W * scale)."""

    def __init__(self, arch: SwinArch):
        super().__init__()
        self.arch = arch
        dim = arch.embed_dim
        mean = RGB_MEAN if arch.in_channels == 3 else (0.0,) * arch.in_channels
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(arch.in_channels, dim, 3, 1, 1)
        self.patch_embed = nn.Module()
        self.patch_embed.norm = nn.LayerNorm(dim) if arch.patch_norm else nn.Identity()
        self.layers = nn.ModuleList(RSTB(arch, d, h) for d, h in zip(arch.depths, arch.heads, strict=True))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = _conv_block(dim, arch.resi_connection)
        nf, out = arch.num_feat, arch.out_channels
        if arch.upsampler in ("pixelshuffle", "nearest+conv"):
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, nf, 3, 1, 1), nn.LeakyReLU(inplace=True))
        if arch.upsampler == "pixelshuffle":
            layers = [nn.Conv2d(nf, 9 * nf, 3, 1, 1), nn.PixelShuffle(3)] if arch.scale == 3 else []
            for _ in range(int(math.log2(arch.scale)) if arch.scale != 3 else 0):
                layers += [nn.Conv2d(nf, 4 * nf, 3, 1, 1), nn.PixelShuffle(2)]
            self.upsample = nn.Sequential(*layers)
            self.conv_last = nn.Conv2d(nf, out, 3, 1, 1)
        elif arch.upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(nn.Conv2d(dim, out * arch.scale**2, 3, 1, 1), nn.PixelShuffle(arch.scale))
        elif arch.upsampler == "nearest+conv":
            self.conv_up1 = nn.Conv2d(nf, nf, 3, 1, 1)
            if arch.scale == 4:
                self.conv_up2 = nn.Conv2d(nf, nf, 3, 1, 1)
            self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
            self.conv_last = nn.Conv2d(nf, out, 3, 1, 1)
        else:
            self.conv_last = nn.Conv2d(dim, out, 3, 1, 1)

    def features(self, x):  # (B, C, H, W) -> (B, C, H, W) through the Swin layers
        h, w = x.shape[2], x.shape[3]
        y = self.patch_embed.norm(x.flatten(2).transpose(1, 2))
        for layer in self.layers:
            y = layer(y, h, w)
        return self.norm(y).transpose(1, 2).reshape(-1, x.shape[1], h, w)

    def forward(self, x):
        x = x - self.mean
        kind = self.arch.upsampler
        if kind == "":
            first = self.conv_first(x)
            return x + self.conv_last(self.conv_after_body(self.features(first)) + first) + self.mean
        first = self.conv_first(x)
        y = self.conv_after_body(self.features(first)) + first
        if kind == "pixelshuffledirect":
            return self.upsample(y) + self.mean
        y = self.conv_before_upsample(y)
        if kind == "pixelshuffle":
            return self.conv_last(self.upsample(y)) + self.mean
        y = F.leaky_relu(self.conv_up1(F.interpolate(y, scale_factor=2.0, mode="nearest")), LRELU_SLOPE)
        if self.arch.scale == 4:
            y = F.leaky_relu(self.conv_up2(F.interpolate(y, scale_factor=2.0, mode="nearest")), LRELU_SLOPE)
        return self.conv_last(F.leaky_relu(self.conv_hr(y), LRELU_SLOPE)) + self.mean


BUFFERS = re.compile(r".*\.(attn_mask|relative_position_index)$")  # size-dependent buffers: rebuilt, not loaded


def detect(state: dict) -> tuple[SwinArch, dict] | None:
    """(the SwinIR architecture, its loadable tensors) of a SwinIR state dict, or None."""
    if "conv_first.weight" not in state or "layers.0.residual_group.blocks.0.attn.qkv.weight" not in state:
        return None
    layers = 1 + _last_index(state, r"^layers\.(\d+)\.")
    depths = tuple(1 + _last_index(state, rf"^layers\.{i}\.residual_group\.blocks\.(\d+)\.") for i in range(layers))
    tables = [state[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"] for i in range(layers)]
    window = (round(math.sqrt(tables[0].shape[0])) + 1) // 2
    first = state["conv_first.weight"]  # (embed, C_in, 3, 3)
    dim, in_channels = int(first.shape[0]), int(first.shape[1])
    if "conv_up1.weight" in state:
        upsampler, scale = "nearest+conv", 4 if "conv_up2.weight" in state else 2
    elif "conv_before_upsample.0.weight" in state:
        ups = [v for k, v in state.items() if re.fullmatch(r"upsample\.\d+\.weight", k)]
        nf = int(state["conv_before_upsample.0.weight"].shape[0])
        upsampler, scale = "pixelshuffle", 3 if ups[0].shape[0] == 9 * nf else 2 ** len(ups)
    elif "upsample.0.weight" in state:
        upsampler = "pixelshuffledirect"
        scale = round(math.sqrt(state["upsample.0.weight"].shape[0] / in_channels))
    else:
        upsampler, scale = "", 1
    last = state.get("conv_last.weight", state.get("upsample.0.weight"))
    out_channels = int(last.shape[0]) if upsampler != "pixelshuffledirect" else in_channels
    mask = state.get("layers.0.residual_group.blocks.1.attn_mask")
    trained = int(round(math.sqrt(mask.shape[0]))) * window if mask is not None else 2 * window
    arch = SwinArch(
        scale=scale, in_channels=in_channels, out_channels=out_channels, embed_dim=dim, depths=depths,
        heads=tuple(int(t.shape[1]) for t in tables), window=window,
        mlp_hidden=int(state["layers.0.residual_group.blocks.0.mlp.fc1.weight"].shape[0]), upsampler=upsampler,
        resi_connection="3conv" if "conv_after_body.4.weight" in state else "1conv",
        num_feat=int(state.get("conv_before_upsample.0.weight", torch.zeros(64)).shape[0]),
        shift=trained > window, patch_norm="patch_embed.norm.weight" in state, blocks=sum(depths), features=dim,
    )  # fmt: skip
    return arch, {k: v for k, v in state.items() if not BUFFERS.match(k)}


def _last_index(state: dict, pattern: str) -> int:
    return max(int(m.group(1)) for k in state if (m := re.match(pattern, k)))
