"""The ESRGAN family's networks as small torch modules, for export only: RRDBNet (ESRGAN, Wang et al. 2018, and
Real-ESRGAN's x4plus/x2plus/anime_6B, Wang et al. 2021) and Real-ESRGAN's SRVGGNetCompact (realesr-general-x4v3,
realesr-animevideov3). Written from the papers' descriptions and the published state-dict layouts, so that
exporting needs neither spandrel nor torchvision; `detect` reads the architecture and its sizes from the keys.

Old ESRGAN files (the original repository's `model.N...` layout, e.g. 4x-UltraSharp) are renamed to the
Real-ESRGAN layout by `old_esrgan_keys` before loading.
"""

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

LRELU_SLOPE = 0.2  # ESRGAN's LeakyReLU
RESIDUAL_SCALE = 0.2  # ESRGAN's residual scaling inside dense blocks and RRDBs
COMPACT_LRELU_SLOPE = 0.1  # SRVGGNetCompact's LeakyReLU when it has no PReLU weights


@dataclass(frozen=True)
class Arch:
    """What `detect` read from a state dict: enough to build the module and describe it in the manifest."""

    name: str  # "ESRGAN" (RRDBNet) or "RealESRGAN Compact" (SRVGGNetCompact)
    scale: int  # output size / input size
    in_channels: int
    out_channels: int
    features: int  # nf / num_feat
    blocks: int  # RRDBNet: RRDB blocks; compact: body convolutions between the first and last
    growth: int = 0  # RRDBNet: gc, the dense blocks' growth channels
    unshuffle: int = 1  # RRDBNet x2/x1: pixel-unshuffle factor before the first conv (input sides its multiple)
    activation: str = "lrelu"  # compact: "prelu" or "lrelu"


class DenseBlock(nn.Module):
    """Residual dense block: five 3x3 convs, each fed all earlier outputs; out = x + 0.2 * conv5(...)."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        for i in range(4):
            setattr(self, f"conv{i + 1}", nn.Conv2d(nf + i * gc, gc, 3, 1, 1))
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

    def forward(self, x):
        feats = [x]
        for i in range(4):
            feats.append(F.leaky_relu(getattr(self, f"conv{i + 1}")(torch.cat(feats, 1)), LRELU_SLOPE))
        return x + RESIDUAL_SCALE * self.conv5(torch.cat(feats, 1))


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, out = x + 0.2 * blocks(x)."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = DenseBlock(nf, gc), DenseBlock(nf, gc), DenseBlock(nf, gc)

    def forward(self, x):
        return x + RESIDUAL_SCALE * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """ESRGAN's generator: conv, RRDB trunk + conv with a long skip, nearest x2 upsampling convs, two output convs.
    Input (B, C, H, W) in [0, 1] -> (B, C_out, H * scale, W * scale)."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.unshuffle = arch.unshuffle
        nf, ups = arch.features, (arch.scale * arch.unshuffle).bit_length() - 1
        self.conv_first = nn.Conv2d(arch.in_channels * arch.unshuffle**2, nf, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(nf, arch.growth) for _ in range(arch.blocks)))
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        for i in range(ups):
            setattr(self, f"conv_up{i + 1}", nn.Conv2d(nf, nf, 3, 1, 1))
        self.ups = ups
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, arch.out_channels, 3, 1, 1)

    def forward(self, x):
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(self.ups):
            up = F.interpolate(feat, scale_factor=2.0, mode="nearest")
            feat = F.leaky_relu(getattr(self, f"conv_up{i + 1}")(up), LRELU_SLOPE)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), LRELU_SLOPE))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact net: conv + activation pairs in `body`, a last conv to C_out * scale^2 channels, pixel
    shuffle, plus the nearest-upsampled input."""

    def __init__(self, arch: Arch):
        super().__init__()
        nf, self.scale = arch.features, arch.scale
        layers = [nn.Conv2d(arch.in_channels, nf, 3, 1, 1), _activation(arch.activation, nf)]
        for _ in range(arch.blocks):
            layers += [nn.Conv2d(nf, nf, 3, 1, 1), _activation(arch.activation, nf)]
        layers.append(nn.Conv2d(nf, arch.out_channels * arch.scale**2, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        out = F.pixel_shuffle(self.body(x), self.scale)
        return out + F.interpolate(x, scale_factor=float(self.scale), mode="nearest")


def _activation(kind: str, nf: int) -> nn.Module:
    return nn.PReLU(num_parameters=nf) if kind == "prelu" else nn.LeakyReLU(COMPACT_LRELU_SLOPE)


def build(arch) -> nn.Module:
    from sdrt.export import upscaler_hat, upscaler_swin2sr, upscaler_swinir

    if isinstance(arch, upscaler_hat.HATArch):
        return upscaler_hat.HAT(arch)
    if isinstance(arch, upscaler_swin2sr.Swin2Arch):  # before SwinArch: a subclass of it
        return upscaler_swin2sr.Swin2SR(arch)
    if isinstance(arch, upscaler_swinir.SwinArch):
        return upscaler_swinir.SwinIR(arch)
    return RRDBNet(arch) if arch.name == "ESRGAN" else SRVGGNetCompact(arch)


_OLD_RRDB = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_OLD_TOP = re.compile(r"^model\.(\d+)\.(weight|bias)$")


def old_esrgan_keys(state: dict) -> dict:
    """The original ESRGAN layout (`model.0`, `model.1.sub.N.RDBk.convj.0`, `model.1.sub.<last>`, then the
    upsampling convs at model.3, 6, ..., the HR conv and the last conv) renamed to RRDBNet's names."""
    renamed, tops = {}, set()
    trunk = max((int(m.group(1)) for k in state if (m := re.match(r"^model\.1\.sub\.(\d+)\.weight$", k))), default=None)
    for key, value in state.items():
        if m := _OLD_RRDB.match(key):
            block, rdb, conv, kind = m.groups()
            renamed[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = value
        elif trunk is not None and key in (f"model.1.sub.{trunk}.weight", f"model.1.sub.{trunk}.bias"):
            renamed[f"conv_body.{key.rsplit('.', 1)[1]}"] = value
        elif m := _OLD_TOP.match(key):
            tops.add(int(m.group(1)))
        else:
            raise KeyError(key)
    order = sorted(tops)  # model.0 first conv; then up convs; then HR conv and last conv
    names = ["conv_first", *(f"conv_up{i + 1}" for i in range(len(order) - 3)), "conv_hr", "conv_last"]
    for index, name in zip(order, names, strict=True):
        for kind in ("weight", "bias"):
            if f"model.{index}.{kind}" in state:
                renamed[f"{name}.{kind}"] = state[f"model.{index}.{kind}"]
    return renamed


# Architectures spandrel knows that sdrt does not export, by keys only their files hold: named in the refusal
KNOWN_UNSUPPORTED = {
    "DAT (Dual Aggregation Transformer)": ("before_RG.1.weight", "layers.0.blocks.0.attn.attns.0.pos.pos_proj.weight"),
}


def detect(state: dict) -> tuple[Arch, dict] | None:
    """(the architecture, the state dict in its module's names) of an ESRGAN-family, SwinIR, Swin2SR or HAT state
    dict, or None; ValueError for a known architecture in a form sdrt does not export (the message says which)."""
    from sdrt.export import upscaler_hat, upscaler_swin2sr, upscaler_swinir

    for name, keys in KNOWN_UNSUPPORTED.items():
        if all(k in state for k in keys):
            raise ValueError(f"{name} is not supported")
    if (hat := upscaler_hat.detect(state)) is not None:  # its files have SwinIR's keys too
        return hat
    if (swin2sr := upscaler_swin2sr.detect(state)) is not None:  # first: its files have SwinIR's keys too
        return swin2sr
    if (swinir := upscaler_swinir.detect(state)) is not None:
        return swinir
    if "model.0.weight" in state and any(k.startswith("model.1.sub.") for k in state):
        try:
            state = old_esrgan_keys(state)
        except (KeyError, ValueError):
            return None
    if "conv_first.weight" in state and "conv_last.weight" in state and "body.0.rdb1.conv1.weight" in state:
        return _rrdb_arch(state), state
    if "body.0.weight" in state and _conv_count(state) >= 3:
        return _compact_arch(state), state
    return None


def _rrdb_arch(state: dict) -> Arch:
    first, last = state["conv_first.weight"], state["conv_last.weight"]  # (nf, C_in * u^2, 3, 3), (C_out, nf, 3, 3)
    out_channels = int(last.shape[0])
    unshuffle = {out_channels: 1, out_channels * 4: 2, out_channels * 16: 4}.get(int(first.shape[1]), 1)
    ups = sum(1 for k in state if re.fullmatch(r"conv_up\d+\.weight", k))
    blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"^body\.(\d+)\.", k)))
    return Arch(
        name="ESRGAN",
        scale=2**ups // unshuffle,
        in_channels=int(first.shape[1]) // unshuffle**2,
        out_channels=out_channels,
        features=int(first.shape[0]),
        blocks=blocks,
        growth=int(state["body.0.rdb1.conv1.weight"].shape[0]),
        unshuffle=unshuffle,
    )


def _conv_count(state: dict) -> int:
    return sum(1 for k, v in state.items() if re.fullmatch(r"body\.\d+\.weight", k) and v.ndim == 4)


def _compact_arch(state: dict) -> Arch:
    convs = sorted(
        int(k.split(".")[1]) for k, v in state.items() if re.fullmatch(r"body\.\d+\.weight", k) and v.ndim == 4
    )
    first, last = state[f"body.{convs[0]}.weight"], state[f"body.{convs[-1]}.weight"]
    in_channels, features = int(first.shape[1]), int(first.shape[0])
    out_channels = in_channels
    scale = round((int(last.shape[0]) / out_channels) ** 0.5)
    prelu = "body.1.weight" in state and state["body.1.weight"].ndim == 1
    return Arch(
        name="RealESRGAN Compact",
        scale=scale,
        in_channels=in_channels,
        out_channels=out_channels,
        features=features,
        blocks=len(convs) - 2,
        activation="prelu" if prelu else "lrelu",
    )
