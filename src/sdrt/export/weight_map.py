"""Which ONNX initializer holds each Linear and Conv2d weight of an exported module: the map LoRA merging needs.

The TorchScript exporter renames Linear weights (`onnx::MatMul_1234`) and stores them transposed, (in, out), for
MatMul, or keeps them (out, in) for Gemm; convolutions keep their names. The map is found by value: each weight,
in the export's dtype and in each layout the exporter may have written it, is hashed and looked up among the
initializers of that shape, so it holds whatever names the exporter chose. A weight found in no initializer, or
sharing one with another weight (the exporter merges identical constants), is left out: changing it would change
the other too.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from sdrt.engines.onnx_weights import OnnxWeights
from sdrt.runtime.manifest import WEIGHT_MAP_FILE, WEIGHT_MAP_FORMAT

MAPPED_MODELS = ("text_encoder", "text_encoder_2", "unet", "unet_deepcache", "unet_shallow")  # the ones LoRAs change


def module_weights(module) -> dict[str, np.ndarray]:
    """{diffusers module name: weight} of every Linear and Conv2d; CLIP's "text_model." prefix dropped."""
    import torch

    out = {}
    for name, layer in module.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            out[name.removeprefix("text_model.")] = layer.weight.detach().cpu().numpy()
    return out


def _digest(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


def _layouts(weight: np.ndarray) -> dict[str, np.ndarray]:
    """The layouts the exporter may store WEIGHT in: conv (out, in, kh, kw); linear (out, in) or (in, out)."""
    if weight.ndim == 4:
        return {"oihw": weight}
    return {"oi": weight, "io": weight.T}


def build_weight_map(module, onnx_file: Path) -> dict:
    """{"weights": {module name: {"initializer", "layout", "shape"}}, "left_out": {module name: reason}}."""
    weights = module_weights(module)
    graph = OnnxWeights(onnx_file)
    try:
        by_shape: dict[tuple, list[str]] = {}
        for name, info in graph.initializers.items():
            dtype = info.dtype if info.dtype == "bf16" else np.dtype(info.dtype).name
            by_shape.setdefault((info.shape, dtype), []).append(name)
        digests: dict[tuple, dict[str, str]] = {}  # (shape, dtype) -> {digest: initializer}, filled on demand
        found: dict[str, tuple[str, str]] = {}
        left_out: dict[str, str] = {}
        for name, weight in weights.items():
            for layout, array in _layouts(weight).items():
                key = (tuple(array.shape), array.dtype.name)
                if key not in by_shape:
                    continue
                if key not in digests:
                    digests[key] = {_digest(graph.read(n)): n for n in by_shape[key]}
                initializer = digests[key].get(_digest(array))
                if initializer is not None:
                    found[name] = (initializer, layout)
                    break
            else:
                left_out[name] = "no initializer holds its values (folded into another constant?)"
    finally:
        graph.close()
    users: dict[str, list[str]] = {}
    for name, (initializer, _) in found.items():
        users.setdefault(initializer, []).append(name)
    mapped = {}
    for name, (initializer, layout) in found.items():
        if len(users[initializer]) > 1:
            left_out[name] = f"its initializer {initializer} is shared with {len(users[initializer]) - 1} other weights"
        else:
            mapped[name] = {"initializer": initializer, "layout": layout, "shape": list(weights[name].shape)}
    return {"format": WEIGHT_MAP_FORMAT, "version": 1, "weights": mapped, "left_out": left_out}


def write_weight_map(module, onnx_file: Path) -> str:
    """Build the map of MODULE's export ONNX_FILE and write it beside it; its path relative to the model folder."""
    mapping = build_weight_map(module, onnx_file)
    path = Path(onnx_file).parent / WEIGHT_MAP_FILE
    path.write_text(json.dumps(mapping, indent=1) + "\n")
    return f"{Path(onnx_file).parent.name}/{WEIGHT_MAP_FILE}"
