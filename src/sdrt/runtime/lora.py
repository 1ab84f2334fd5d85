"""LoRAs on a loaded model: A1111's `<lora:name:te:unet>` prompt syntax, a folder of files by name, and the merge
W' = W + sum_i w_i * delta_i into the engines' weights, switched per request without re-export.

Each engine is given every changed layer's terms (engine.merge_weights: a LoRA's are its two low-rank factors, scaled)
and merges them into its own weights from base values it keeps, so every switch, and going back to no LoRA, starts
from the exact base without reading the model again (engines/weight_merge.py; on the CPU straight into the
session's buffers, engines/ort_weights.py). Which ONNX initializer holds a layer, and in which layout, comes from the
export's weight map (model.json's "weight_map" entries, export/weight_map.py).
"""

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import regex

from sdrt.errors import InvalidOption, ModelError
from sdrt.runtime.deepcache_lora import merge_into_deepcache
from sdrt.runtime.lora_files import LORA_SUFFIXES, PARTS, LoraFile, read_lora, read_metadata, shorthash

# A1111's extra_networks.re_extra_net: every <type:args> is taken out of the prompt before it is encoded.
EXTRA_NETWORK = regex.compile(r"<(\w+):([^>]+)>")
LORA_TYPES = ("lora", "lyco")  # A1111 reads LyCORIS's old <lyco:...> tags as LoRAs
KOHYA_BASES = ("sd_v1", "sd_v2", "sdxl")  # kohya's ss_base_model_version prefixes (Family.lora_bases)


@dataclass(frozen=True)
class ActiveLora:
    """One LoRA of a request: its name and its weights on the text encoders and the UNet (A1111's te / unet)."""

    name: str
    te: float = 1.0
    unet: float = 1.0

    def weight_for(self, part: str) -> float:
        return self.unet if part == "unet" else self.te

    def tag(self) -> str:
        weights = _number(self.te) if self.te == self.unet else f"{_number(self.te)}:{_number(self.unet)}"
        return f"<lora:{self.name}:{weights}>"


def _number(x: float) -> str:
    return f"{x:g}"


def _weight(value, tag: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise InvalidOption("prompt", tag, "<lora:name>, <lora:name:weight> or <lora:name:te weight:unet weight>, "
                            "weights being finite numbers (te=/unet= also accepted)")  # fmt: skip
    return number


def parse_prompt(prompt: str) -> tuple[str, list[ActiveLora]]:
    """(PROMPT without its <type:...> tags, the LoRAs it names) as A1111's extra_networks.parse_prompt and
    ExtraNetworkLora.activate read them: <lora:name> weight 1, <lora:name:w>, <lora:name:w_te:w_unet>, named
    te=/unet=. Tags of other types (hypernet, ...) are removed with a warning: sdrt has no such networks."""
    found = []

    def take(match) -> str:
        kind, args = match.group(1), match.group(2)
        if kind not in LORA_TYPES:
            warnings.warn(f"{match.group(0)} removed from the prompt: sdrt has no {kind!r} networks", stacklevel=4)
            return ""
        items = args.split(":")
        positional = [item for item in items if "=" not in item]
        named = dict(item.split("=", 1) for item in items if "=" in item)
        name = positional[0].strip() if positional else ""
        if not name:
            raise InvalidOption("prompt", match.group(0), "<lora:name...> with the name of a LoRA")
        te = _weight(positional[1], match.group(0)) if len(positional) > 1 else 1.0
        te = _weight(named["te"], match.group(0)) if "te" in named else te
        unet = _weight(positional[2], match.group(0)) if len(positional) > 2 else te
        unet = _weight(named["unet"], match.group(0)) if "unet" in named else unet
        found.append(ActiveLora(name, te, unet))
        return ""

    return EXTRA_NETWORK.sub(take, prompt), found


def strip_tags(prompt: str) -> str:
    """PROMPT as the text encoder sees it: without any <type:...> tag."""
    return EXTRA_NETWORK.sub("", prompt)


def requested(prompt: str, loras) -> tuple[str, list[ActiveLora]]:
    """(the prompt to record, with LORAS' tags appended as A1111 does for its default LoRA; every LoRA asked for).

    LORAS: {name: weight} or {name: (te weight, unet weight)} from a program, added to the prompt's own tags."""
    _, active = parse_prompt(prompt)
    if loras is None:
        return prompt, active
    if not isinstance(loras, dict):
        raise InvalidOption("loras", type(loras).__name__, "a dict {name: weight} or {name: (te, unet)}")
    extra = []
    for name, weight in loras.items():
        if not isinstance(name, str) or not name or any(c in name for c in ":<>"):
            raise InvalidOption("loras", repr(name), "LoRA names without ':', '<' or '>'")
        te, unet = weight if isinstance(weight, (tuple, list)) and len(weight) == 2 else (weight, weight)
        extra.append(ActiveLora(name, _weight(te, f"loras[{name!r}]"), _weight(unet, f"loras[{name!r}]")))
    return prompt + "".join(a.tag() for a in extra), active + extra


def infotext_hashes(active: list[ActiveLora], files: dict) -> str | None:
    """A1111's "Lora hashes" value: "name: shorthash, ..." (names without ':' and ','), for the LoRAs used."""
    seen = {}
    for lora in active:
        name = lora.name.replace(":", "").replace(",", "")
        seen.setdefault(name, files[lora.name].shorthash)
    return ", ".join(f"{name}: {digest}" for name, digest in seen.items()) or None


def parse_hashes(text: str) -> dict[str, str]:
    """{name: shorthash} of a "Lora hashes" infotext value."""
    out = {}
    for item in str(text).split(","):
        name, _, digest = item.strip().rpartition(":")
        if name.strip() and digest.strip():
            out[name.strip()] = digest.strip()
    return out


# ----------------------------------------------------------------------------------------------- model layers

RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                "conv_shortcut": "skip_connection"}  # fmt: skip


def ldm_names(names) -> dict[str, str]:
    """{diffusers UNet layer: its name in the original LDM/SGM layout} (input_blocks.N / middle_block /
    output_blocks.N), which kohya's SDXL LoRAs use; the block numbering follows from the layer names themselves."""
    names = list(names)
    blocks = 1 + max((int(n.split(".")[1]) for n in names if n.startswith("down_blocks.")), default=-1)
    layers = 1 + max((int(n.split(".")[3]) for n in names if n.startswith("down_blocks.0.resnets.")), default=-1)
    prefixes = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                "conv_in": "input_blocks.0.0", "conv_out": "out.2", "mid_block.resnets.0": "middle_block.0",
                "mid_block.attentions.0": "middle_block.1", "mid_block.resnets.1": "middle_block.2"}  # fmt: skip
    for i in range(blocks):
        for j in range(layers):
            prefixes[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{(layers + 1) * i + j + 1}.0"
            prefixes[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{(layers + 1) * i + j + 1}.1"
        prefixes[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(layers + 1) * (i + 1)}.0.op"
        attention = any(n.startswith(f"up_blocks.{i}.attentions.") for n in names)
        for j in range(layers + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{(layers + 1) * i + j}.0"
            prefixes[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{(layers + 1) * i + j}.1"
        upsampler = f"output_blocks.{(layers + 1) * i + layers}.{2 if attention else 1}.conv"
        prefixes[f"up_blocks.{i}.upsamplers.0.conv"] = upsampler
    out = {}
    for name in names:
        for prefix, ldm in prefixes.items():
            if name == prefix or name.startswith(prefix + "."):
                rest = name[len(prefix) :].lstrip(".")
                if ".resnets." in prefix or prefix.startswith("mid_block.resnets"):
                    rest = RESNET_PARTS.get(rest, rest)
                out[name] = f"{ldm}.{rest}" if rest else ldm
                break
    return out


class LayerIndex:
    """One model part's LoRA-changeable layers (from its weight map) and every key a file may name them by."""

    def __init__(self, part: str, weight_map: dict):
        self.part = part
        self.layers = weight_map  # diffusers name -> {"initializer", "layout", "shape"}
        self.by_key = {}
        aliases = ldm_names(weight_map) if part == "unet" else {}
        for name in weight_map:
            for key in (name, aliases.get(name)):
                if key:
                    self.by_key.setdefault(key, name)
                    self.by_key.setdefault(key.replace(".", "_"), name)

    def find(self, key: str) -> str | None:
        return self.by_key.get(key)


# ----------------------------------------------------------------------------------------------- merging


@dataclass(frozen=True)
class Target:
    """A LoRA layer placed on the model: the initializer it changes, the initializer's layout and the layer shape."""

    initializer: str
    layout: str  # "oi" | "io" (transposed Linear) | "oihw"
    shape: tuple
    update: object  # lora_files.LayerUpdate


class Loras:
    """The LoRAs a Pipeline can use (a folder's files by name) and the set merged into its engines now."""

    def __init__(self, manifest, engines: dict, fitting_bases: tuple[str, ...] = KOHYA_BASES):
        self.manifest = manifest
        self.engines = engines
        self.fitting_bases = fitting_bases  # the family's lora_bases: a LoRA recorded for another base is refused
        self.indexes = {}
        for part in PARTS:
            weight_map = manifest.weight_map(part) if part in manifest.models else None
            if weight_map is not None:
                self.indexes[part] = LayerIndex(part, weight_map)
        self.folder: Path | None = None
        self.available: dict[str, Path] = {}  # name -> file
        self.files: dict[str, LoraFile] = {}  # parsed and checked against this model, by name
        self.targets: dict[str, dict[str, list[Target]]] = {}  # name -> part -> targets
        self.applied: dict[str, tuple] = {part: () for part in self.indexes}  # part -> ((name, weight), ...)

    def load_dir(self, folder) -> "Loras":
        """Every LoRA file under FOLDER (subfolders too), by file stem as A1111 names them; read when first used."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InvalidOption("loras", str(folder), "a folder of .safetensors, .pt, .ckpt or .bin LoRA files")
        self.folder = folder
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in LORA_SUFFIXES and path.is_file():
                if path.stem in self.available:
                    warnings.warn(f"LoRA {path.stem!r}: {path} ignored, {self.available[path.stem]} has the name",
                                  stacklevel=2)  # fmt: skip
                    continue
                self.available[path.stem] = path
        return self

    def prepare_engines(self) -> None:
        """Let each engine that can get ready for new weights of its mapped layers now (the CPU engine makes its
        in-place session, OpenVINO compiles them as inputs), so that the first LoRA costs what a switch does."""
        for part, index in self.indexes.items():
            engine = self.engines.get(part)
            if engine is not None and engine.capabilities.prepared_weights:
                engine.prepare_weights(sorted({layer["initializer"] for layer in index.layers.values()}))

    def listing(self) -> list[dict]:
        """A1111's GET /sdapi/v1/loras entries: name, alias, path (relative to the LoRA folder), metadata."""
        out = []
        for name, path in self.available.items():
            metadata = read_metadata(path)
            out.append({"name": name, "alias": metadata.get("ss_output_name", name), "path": self.relative(path),
                        "metadata": metadata})  # fmt: skip
        return out

    def relative(self, path: Path) -> str:
        """PATH relative to the LoRA folder: what messages and the API show of a file."""
        return str(path.relative_to(self.folder)) if self.folder is not None else path.name

    def file(self, name: str) -> LoraFile:
        """The LoRA NAME, read and checked against this model once."""
        if name not in self.files:
            if not self.indexes:
                raise ModelError(f"{self.manifest.folder} has no weight map for LoRAs: re-export it with this sdrt")
            if name not in self.available:
                known = ", ".join(sorted(self.available)[:20]) or "none: pass a LoRA folder (--lora-dir / loras=)"
                raise InvalidOption("lora", name, f"a LoRA in the LoRA folder ({known})")
            lora = read_lora(self.available[name], self.relative(self.available[name]))
            self.targets[name] = self._place(lora)
            self.files[name] = lora
        return self.files[name]

    def _place(self, lora: LoraFile) -> dict[str, list[Target]]:
        """LORA's layers on this model's initializers; a LoRA for another model is refused, naming what it targets."""
        family = self.manifest.family
        where = f"{lora.path.name} targets {lora.targets()}"
        base = str(lora.metadata.get("ss_base_model_version", "")).lower()
        if base.startswith(KOHYA_BASES) and not base.startswith(self.fitting_bases):
            raise InvalidOption("lora", lora.name, f"a LoRA for this {family} model ({where})")
        placed: dict[str, list[Target]] = {}
        skipped = []
        for (part, key), update in lora.layers.items():
            index = self.indexes.get(part)
            if index is None:
                if part not in self.manifest.models:
                    raise InvalidOption("lora", lora.name, f"a LoRA for this {family} model, which has no {part} "
                                        f"({where})")  # fmt: skip
                skipped.append(key)
                continue
            name = index.find(key)
            if name is None:
                skipped.append(key)
                continue
            layer = index.layers[name]
            shape = tuple(layer["shape"])
            if update.out_in() != (shape[0], int(np.prod(shape[1:]))):
                raise InvalidOption("lora", lora.name, f"a LoRA for this {family} model ({where}; its {key} is "
                                    f"{update.out_in()} where this model's {name} is {shape})")  # fmt: skip
            placed.setdefault(part, []).append(Target(layer["initializer"], layer["layout"], shape, update))
        if not placed:
            raise InvalidOption("lora", lora.name, f"a LoRA for this {family} model ({where}, and matches none "
                                f"of its layers, e.g. {skipped[0] if skipped else '-'})")  # fmt: skip
        if skipped:
            warnings.warn(f"LoRA {lora.name}: {len(skipped)} of {len(lora.layers)} layers match no layer of this "
                          f"model and are left out (e.g. {skipped[0]})", stacklevel=3)  # fmt: skip
        return placed

    def apply(self, active: list[ActiveLora]) -> None:
        """Merge ACTIVE into the engines: each part whose set of (LoRA, weight) changed gets base + sum w * delta.

        Several LoRAs, and the same LoRA named twice, add up (A1111). An empty ACTIVE restores the base weights."""
        for lora in active:
            self.file(lora.name)
        for part in self.indexes:
            signature = tuple(
                (lora.name, lora.weight_for(part))
                for lora in active
                if lora.weight_for(part) != 0 and part in self.targets[lora.name]
            )
            if signature == self.applied[part]:
                continue
            self.check_engine(part)
            self.engines[part].merge_weights(self.updates(part, signature))
            merge_into_deepcache(self, part, signature)  # DeepCache's UNet graphs take the UNet's (deepcache_lora.py)
            self.applied[part] = signature

    def updates(self, part: str, signature: tuple) -> dict[str, list]:
        """{initializer: [weight_merge term, ...]} of PART for SIGNATURE ((name, weight), ...)."""
        updates: dict[str, list] = {}
        for name, weight in signature:
            for target in self.targets[name][part]:
                term = target.update.term(target.shape, weight, transposed=target.layout == "io")
                updates.setdefault(target.initializer, []).append(term)
        return updates

    def check_engine(self, part: str) -> None:
        """LoRAs merge into the export's own graph: a fused variant (sdrt optimize) packs those weights otherwise,
        or one whose engine places them (engines/fused_weights.py), and an engine must be able to take new weights
        (ONNX Runtime, OpenVINO, TensorRT refit)."""
        engine = self.engines[part]
        if not engine.capabilities.replaceable_weights:
            raise ModelError(
                "LoRAs need an engine that takes new weights (backends cpu, cuda, openvino, tensorrt); "
                f"{type(getattr(engine, 'inner', engine)).__name__} does not yet: use --backend cpu for LoRAs"
            )
        placed = engine.capabilities.fused_weight_places and engine.export_file is not None
        model_file = engine.export_file if placed else engine.model_file
        if Path(model_file) != self.manifest.model_path(part):
            raise ModelError(
                f"LoRAs change {part}'s weights, which the fused graph {Path(model_file).name} holds packed: load the "
                "model with Pipeline.load(..., fused=False) to use LoRAs"
            )

    def fix_names(self, prompt: str, hashes_text: str | None) -> str:
        """A1111's infotext_pasted: a <lora:name> of PROMPT that is not in the folder but whose recorded hash is
        is renamed to that file; a LoRA whose file differs from the recorded hash is used with a warning."""
        recorded = parse_hashes(hashes_text) if hashes_text else {}
        if not recorded:
            return prompt
        hashes = {name: self.files[name].shorthash if name in self.files else shorthash(path)
                  for name, path in self.available.items()}  # fmt: skip
        by_hash = {}
        for name, digest in hashes.items():
            by_hash.setdefault(digest, name)

        def rename(match):
            if match.group(1) not in LORA_TYPES:
                return match.group(0)
            name, _, rest = match.group(2).partition(":")
            digest = recorded.get(name.replace(",", ""))
            if digest is None:
                return match.group(0)
            if name not in self.available and digest in by_hash:
                return f"<{match.group(1)}:{by_hash[digest]}{':' + rest if rest else ''}>"
            if name in self.available and hashes[name] != digest:
                warnings.warn(f"LoRA {name}: the image was made with a file of hash {digest}, this one has "
                              f"{hashes[name]}", stacklevel=3)  # fmt: skip
            return match.group(0)

        return EXTRA_NETWORK.sub(rename, prompt)
