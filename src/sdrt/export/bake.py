"""`sdrt export --lora FILE:WEIGHT`: LoRAs merged into the exported graphs' weights, once, at export time.

The merge is the runtime's own (runtime/lora.py places each file's layers on the export's initializers through the
weight map, engines/weight_merge.py computes base + terms): the graphs' engines are stood in for by FileWeights,
which writes each merged initializer back over its bytes in the .onnx file or its external data, in place (same
dtype, same size). Graph names and the weight map stay valid, so the baked export loads, fuses (`sdrt optimize`)
and takes runtime LoRAs like any other; model.json records what was baked (runtime/lora_baked.py).
"""

import hashlib
import math
from pathlib import Path

import numpy as np

from sdrt.engines.capabilities import Capabilities
from sdrt.engines.onnx_weights import OnnxWeights
from sdrt.engines.weight_merge import merged_value
from sdrt.errors import InvalidOption
from sdrt.runtime.lora import ActiveLora, Loras
from sdrt.runtime.lora_baked import BakedLora
from sdrt.runtime.lora_files import LORA_SUFFIXES
from sdrt.runtime.manifest import Manifest

LORA_OPTION = "--lora"


def parse_lora_option(text: str) -> tuple[Path, float, float]:
    """FILE, FILE:WEIGHT or FILE:TE_WEIGHT:UNET_WEIGHT -> (file, te weight, unet weight); the file must exist."""
    parts = str(text).split(":")
    weights: list[float] = []
    while len(parts) > 1 and len(weights) < 2:
        try:
            number = float(parts[-1])
        except ValueError:
            break
        if not math.isfinite(number):
            break
        weights.insert(0, number)
        parts.pop()
    path = Path(":".join(parts))
    if not path.is_file() or path.suffix.lower() not in LORA_SUFFIXES:
        raise InvalidOption(LORA_OPTION, text, "FILE, FILE:WEIGHT or FILE:TE_WEIGHT:UNET_WEIGHT, FILE an existing "
                            ".safetensors, .pt, .ckpt or .bin LoRA file, weights finite numbers")  # fmt: skip
    te = weights[0] if weights else 1.0
    unet = weights[1] if len(weights) > 1 else te
    return path, te, unet


class FileWeights:
    """An engine stand-in whose merge_weights writes base + terms into MODEL_FILE's initializers in place."""

    capabilities = Capabilities(replaceable_weights=True)

    def __init__(self, model_file: Path):
        self.model_file = Path(model_file)

    def merge_weights(self, updates: dict[str, list]) -> None:
        graph = OnnxWeights(self.model_file)
        try:
            infos = {name: graph.initializers[name] for name in updates}
            merged = {name: merged_value(graph.read(name), terms) for name, terms in updates.items() if terms}
        finally:
            graph.close()
        for name, value in merged.items():
            info = infos[name]
            data = np.ascontiguousarray(value, dtype=np.dtype(info.dtype).newbyteorder("<")).tobytes()
            if info.length >= 0 and len(data) != info.length:
                raise ValueError(f"{self.model_file}: {name} holds {info.length} bytes, the merge made {len(data)}")
            target = self.model_file if info.location is None else self.model_file.parent / info.location
            with open(target, "r+b") as f:
                f.seek(info.offset)
                f.write(data)


def bake_loras(folder: Path, loras: list[tuple[Path, float, float]]) -> list[BakedLora]:
    """Merge LORAS [(file, te weight, unet weight)] into the export in FOLDER and record them in its model.json."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    if "unet_controlnet" in manifest.models:
        raise InvalidOption(LORA_OPTION, str(loras[0][0]), "LoRAs without --controlnet (the ControlNet UNet graph "
                            "has no weight map yet): export the ControlNet graph separately")  # fmt: skip
    engines = {part: FileWeights(manifest.model_path(part)) for part in manifest.models}
    index = Loras(manifest, engines)
    active, baked = [], []
    for i, (path, te, unet) in enumerate(loras):
        name = f"{i}:{path.stem}"  # unique even when two files share a stem
        index.available[name] = Path(path)
        active.append(ActiveLora(name, te, unet))
    index.apply(active)  # the runtime's placement checks (family, shapes, layers) and merge, into the files
    for lora, (path, te, unet) in zip(active, loras, strict=True):
        sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        baked.append(BakedLora(Path(path).stem, sha256, index.files[lora.name].shorthash, te, unet))
    manifest.source["loras"] = [*manifest.source.get("loras", []), *(b.to_json() for b in baked)]
    manifest.save(folder)
    return baked
