"""LoRA files read without running code (Hu et al. 2021; LyCORIS LoHa and LoKr), grouped by the layer they change.

Key layouts (suffixes after the layer's key):
- kohya / A1111: `lora_unet_<module>`, `lora_te_<module>` (SDXL: `lora_te1_`, `lora_te2_`), module paths with "."
  written "_", in diffusers' names (SD 1.x) or the original LDM/SGM ones (`input_blocks_4_1_...`, SDXL);
  `.lora_down.weight`, `.lora_up.weight`, `.alpha`; LoCon adds the same on convolutions.
- diffusers / PEFT: `unet.<module>`, `text_encoder.<module>`, `text_encoder_2.<module>` with `.lora_A.weight`,
  `.lora_B.weight` (or older `.lora.down.weight`/`.lora.up.weight`, `processor.to_q_lora.down.weight`), `.alpha`.
- LyCORIS LoHa: `.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b`, `.alpha`;
  LoKr: `.lokr_w1` or `.lokr_w1_a`/`.lokr_w1_b`, `.lokr_w2` or `.lokr_w2_a`/`.lokr_w2_b`, `.alpha`.

`.safetensors` files are parsed directly; `.pt`/`.ckpt`/`.bin` through embeddings' tensor-only unpickler.
Each layer's update is computed as A1111's Lora extension does (network_lora / network_hada / network_lokr):
delta = scale * update with scale = alpha / rank (1 without alpha).
"""

import hashlib
import json
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdrt.engines.weight_merge import LowRank
from sdrt.errors import InvalidOption
from sdrt.runtime.embeddings import read_safetensors, read_torch_zip

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
MAX_LORA_BYTES = 4 * 2**30
PARTS = ("unet", "text_encoder", "text_encoder_2")  # the models a LoRA changes, named as in model.json

# The tensor names after a layer's key, longest first so ".lora_up.weight" wins over ".weight"-like endings.
_SUFFIXES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up", ".lora_mid.weight": "mid", ".alpha": "alpha",
    ".hada_w1_a": "h1a", ".hada_w1_b": "h1b", ".hada_w2_a": "h2a", ".hada_w2_b": "h2b", ".hada_t1": "t1",
    ".hada_t2": "t2", ".lokr_w1": "w1", ".lokr_w1_a": "w1a", ".lokr_w1_b": "w1b", ".lokr_w2": "w2",
    ".lokr_w2_a": "w2a", ".lokr_w2_b": "w2b", ".lokr_t2": "t2", ".diff": "diff", ".dora_scale": "dora",
}  # fmt: skip
_SUFFIX_ORDER = sorted(_SUFFIXES, key=len, reverse=True)
# kohya prefix -> model part; "lora_te_" is SD 1.x/2.x's one text encoder (SDXL's first, CLIP ViT-L, has its shape)
_KOHYA_PARTS = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                "lora_te_": "text_encoder"}  # fmt: skip
_PEFT_PARTS = {"unet.": "unet", "text_encoder_2.": "text_encoder_2", "text_encoder.": "text_encoder",
               "base_model.model.": "unet"}  # fmt: skip


@dataclass(frozen=True)
class LayerUpdate:
    """One layer's low-rank update as stored: KIND "lora", "loha", "lokr" or "diff", its tensors, its alpha."""

    kind: str
    tensors: dict = field(hash=False)  # role ("down", "up", "w1a", ...) -> float32 array
    alpha: float | None = None

    def term(self, shape: tuple, factor: float = 1.0, transposed: bool = False):
        """FACTOR x the weight update, scale included, as a weight_merge term of a layer of weight SHAPE (out, in[, kh,
        kw]), or with TRANSPOSED of a Linear the export stored as its (in, out) transpose: a LoRA's is the low-rank
        product of its factors (a 3x3 LoCon's too: its 1x1 up-projection is a matrix over the 3x3 down-projection's
        outputs), the others' a whole float32 array."""
        t = self.tensors
        if self.kind == "lora":
            down, up = t["down"], t["up"]  # (r, in[, kh, kw]), (out, r[, 1, 1])
            rank = down.shape[0]
            up = up.reshape(up.shape[0], rank) * np.float32(factor * self._scale(rank))  # (out, r): the cheap side
            down = down.reshape(rank, -1)  # (r, in * kh * kw)
            return LowRank(down.T, up.T) if transposed else LowRank(up, down)
        if self.kind == "loha":  # Hadamard product of two low-rank products
            rank = t["h1b"].shape[0]
            update = (t["h1a"] @ t["h1b"].reshape(rank, -1)) * (t["h2a"] @ t["h2b"].reshape(rank, -1))
        elif self.kind == "lokr":  # Kronecker product; a conv's kernel rides in the second factor
            w1 = t["w1"] if "w1" in t else t["w1a"] @ t["w1b"]
            w2 = t["w2"] if "w2" in t else t["w2a"] @ t["w2b"].reshape(t["w2b"].shape[0], -1)
            update = np.kron(w1[:, :, None, None] if w2.ndim == 4 else w1, w2)
            # A1111's network_lokr: the rank of the last decomposed factor (alpha ignored for full factors)
            rank = t["w2b"].shape[0] if "w2b" in t else t["w1b"].shape[0] if "w1b" in t else None
        else:  # diff: the full update
            rank, update = None, t["diff"]
        if update.size != int(np.prod(shape)):
            raise ValueError(f"update of {update.size} values for a weight of shape {tuple(shape)}")
        update = update.reshape(shape) * np.float32(factor * self._scale(rank))
        return np.ascontiguousarray(update.T) if transposed else update

    def _scale(self, rank) -> float:
        return self.alpha / rank if self.alpha is not None and rank else 1.0

    def out_in(self) -> tuple[int, int]:
        """(out features, in features x kernel) the update is shaped for: what a layer must match."""
        t = self.tensors
        if self.kind == "lora":
            return t["up"].shape[0], int(np.prod(t["down"].shape[1:]))
        if self.kind == "loha":
            return t["h1a"].shape[0], int(np.prod(t["h1b"].shape[1:]))
        if self.kind == "diff":
            return t["diff"].shape[0], int(np.prod(t["diff"].shape[1:]))
        w1 = t["w1"].shape if "w1" in t else (t["w1a"].shape[0], t["w1b"].shape[1])
        w2 = t["w2"].shape if "w2" in t else (t["w2a"].shape[0], *t["w2b"].shape[1:])
        return w1[0] * w2[0], w1[1] * int(np.prod(w2[1:]))  # a LoKr's factors may hold the whole update


@dataclass(frozen=True)
class LoraFile:
    """A parsed LoRA: NAME (the file stem, used in prompts), its layers by (part, key), and what A1111 shows."""

    name: str
    path: Path
    layers: dict = field(hash=False)  # (part, layer key as written, "." or "_" separated) -> LayerUpdate
    shorthash: str  # A1111's: sha256 of a .safetensors file's data after its header (else the file), 12 hex
    metadata: dict = field(default_factory=dict, hash=False)
    layout: str = "kohya"  # "kohya" (underscore keys) or "diffusers" (dotted keys)

    @property
    def alias(self) -> str:
        return str(self.metadata.get("ss_output_name") or self.name)

    def targets(self) -> str:
        """What the file is for, in words (for errors): its parts, layouts, and base model when its metadata says."""
        parts = sorted({part for part, _ in self.layers})
        base = self.metadata.get("ss_base_model_version") or self.metadata.get("modelspec.architecture")
        text = f"{', '.join(parts) or 'no known model part'} ({self.layout} keys"
        return text + (f", trained on {base})" if base else ")")


def read_lora(path, label: str | None = None) -> LoraFile:
    """Parse the LoRA file PATH; a file that is not one is refused with InvalidOption naming it (as LABEL: a server
    names files relative to its LoRA folder, never by their path on the server)."""
    path = Path(path)
    label = str(path) if label is None else label
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise InvalidOption("lora", label, "a .safetensors, .pt, .ckpt or .bin file")
    if path.stat().st_size > MAX_LORA_BYTES:
        raise InvalidOption("lora", label, f"a file under {MAX_LORA_BYTES // 2**30} GiB")
    data = path.read_bytes()
    try:
        if path.suffix.lower() == ".safetensors":
            tensors, metadata = read_safetensors(data), safetensors_metadata(data)
        else:
            tensors, metadata = read_torch_zip(data), {}
        digest = shorthash(path, data, metadata)
        layers, layout = group_layers(tensors)
    except (ValueError, KeyError, TypeError, struct.error, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise InvalidOption("lora", label, f"a LoRA file ({e})") from None
    if not layers:
        raise InvalidOption("lora", label, "a LoRA file (no lora_down/lora_up, lora_A/lora_B, LoHa or LoKr tensors)")
    return LoraFile(path.stem, path, layers, digest, metadata, layout)


def shorthash(path: Path, data: bytes | None = None, metadata: dict | None = None) -> str:
    """A1111's LoRA short hash: 12 hex digits of the metadata's sshs_model_hash, else of the sha256 of a
    .safetensors file's bytes after its header (the "addnet" hash), else of the whole file's."""
    path = Path(path)
    data = path.read_bytes() if data is None else data
    if path.suffix.lower() != ".safetensors":
        return hashlib.sha256(data).hexdigest()[:12]
    metadata = safetensors_metadata(data) if metadata is None else metadata
    (header_len,) = struct.unpack("<Q", data[:8])
    return str(metadata.get("sshs_model_hash") or hashlib.sha256(memoryview(data)[8 + header_len :]).hexdigest())[:12]


def safetensors_metadata(data: bytes) -> dict:
    """The "__metadata__" strings of a .safetensors header (kohya's ss_* training facts)."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def read_metadata(path: Path) -> dict:
    """A .safetensors file's metadata without reading its tensors (others: {})."""
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(path.stat().st_size, 100 * 2**20):
                return {}
            return safetensors_metadata(struct.pack("<Q", header_len) + f.read(header_len))
    except (OSError, ValueError, struct.error):
        return {}


def _split(key: str) -> tuple[str, str] | None:
    for suffix in _SUFFIX_ORDER:
        if key.endswith(suffix):
            return key[: -len(suffix)], _SUFFIXES[suffix]
    return None


def _part(key: str) -> tuple[str, str, str] | None:
    """(model part, layer key within it, layout) of a layer key, or None for a key of no known model part."""
    for prefix, part in _KOHYA_PARTS.items():
        if key.startswith(prefix):
            return part, key[len(prefix) :].removeprefix("text_model_"), "kohya"
    for prefix, part in _PEFT_PARTS.items():
        if key.startswith(prefix):
            inner = key[len(prefix) :].removeprefix("text_model.")
            # diffusers' attention-processor LoRA: attn1.processor.to_q_lora -> attn1.to_q (to_out_lora: to_out.0)
            inner = inner.replace(".processor.", ".").replace("to_out_lora", "to_out.0")
            for proj in ("to_q", "to_k", "to_v"):
                inner = inner.replace(f"{proj}_lora", proj)
            return part, inner, "diffusers"
    return None


def group_layers(tensors: dict) -> tuple[dict, str]:
    """{(part, layer key): LayerUpdate} of a state dict, and its key layout ("kohya" or "diffusers")."""
    groups: dict[tuple[str, str], dict] = {}
    layouts = set()
    for key, value in tensors.items():
        split = _split(key)
        if split is None or not isinstance(value, np.ndarray):
            continue
        layer, role = split
        located = _part(layer)
        if located is None:
            continue
        part, inner, layout = located
        layouts.add(layout)
        groups.setdefault((part, inner), {})[role] = value
    layers = {}
    for where, group in groups.items():
        alpha = group.pop("alpha", None)
        alpha = None if alpha is None else float(np.asarray(alpha, dtype=np.float64).reshape(-1)[0])
        for unsupported, what in (("mid", "LoCon's CP-decomposed lora_mid"), ("t1", "LoHa's CP-decomposed hada_t1"),
                                  ("t2", "CP-decomposed t2 tensors"), ("dora", "DoRA's dora_scale")):  # fmt: skip
            if unsupported in group:
                raise ValueError(f"{what} (layer {where[1]}) is not supported")
        tensors32 = {role: np.asarray(a, dtype=np.float32) for role, a in group.items()}
        if {"down", "up"} <= group.keys():
            kind = "lora"
        elif {"h1a", "h1b", "h2a", "h2b"} <= group.keys():
            kind = "loha"
        elif ("w1" in group or {"w1a", "w1b"} <= group.keys()) and ("w2" in group or {"w2a", "w2b"} <= group.keys()):
            kind = "lokr"
        elif "diff" in group:
            kind = "diff"
        else:
            raise ValueError(f"layer {where[1]} has tensors {sorted(group)}: not a LoRA, LoHa or LoKr layer")
        layers[where] = LayerUpdate(kind, tensors32, alpha)
    return layers, ("kohya" if layouts == {"kohya"} else "diffusers" if layouts == {"diffusers"} else "mixed")

