"""LoRAs on DeepCache's two UNet graphs (runtime/deepcache.py): whenever the UNet's merged LoRAs change
(lora.Loras.apply), the same updates go into unet_deepcache and unet_shallow, each placed through that graph's own
weight map (export wrote one per graph: the exporter names and lays out each graph's initializers its own way).

Every UNet layer is in the full graph; the shallow graph holds only the shallow layers, so the deep layers' updates
reach it through the cached feature, which the full graph computed with them, as the paper's U-Net with merged
weights would. DeepCache graphs exported before the weight maps (no "weight_map" entry) take no LoRA:
deepcache.check_options refuses LoRAs with DeepCache on them.
"""

import weakref

from sdrt.errors import ModelError
from sdrt.runtime.deepcache import DEEPCACHE_FULL, DEEPCACHE_SHALLOW, takes_loras

DENOISER_PART = "unet"  # the LoRA part whose updates DeepCache's graphs share
_prepared = weakref.WeakSet()  # engines whose mapped weights were made replaceable (Loras.prepare_engines' step)


def merge_into_deepcache(loras, part: str, signature: tuple) -> None:
    """After LORAS (lora.Loras) merged SIGNATURE ((name, weight), ...) into PART: the same into DeepCache's graphs
    when PART is the UNet and the folder has them (with weight maps); nothing otherwise."""
    manifest = loras.manifest
    if part != DENOISER_PART or DEEPCACHE_FULL not in loras.engines or not takes_loras(manifest):
        return
    layer_of = {layer["initializer"]: name for name, layer in loras.indexes[part].layers.items()}
    for graph in (DEEPCACHE_FULL, DEEPCACHE_SHALLOW):
        graph_map = manifest.weight_map(graph)
        updates: dict[str, list] = {}
        for name, weight in signature:
            for target in loras.targets[name][part]:
                layer = graph_map.get(layer_of[target.initializer])
                if layer is None:
                    if graph == DEEPCACHE_FULL:
                        raise ModelError(f"{manifest.folder}: {graph} has no weight for the UNet layer "
                                         f"{layer_of[target.initializer]}; re-export its DeepCache graphs")  # fmt: skip
                    continue  # a deep layer: the shallow graph does not run it
                term = target.update.term(target.shape, weight, transposed=layer["layout"] == "io")
                updates.setdefault(layer["initializer"], []).append(term)
        loras.check_engine(graph)
        engine = loras.engines[graph]
        if engine.capabilities.prepared_weights and engine not in _prepared:  # OpenVINO: its base values mapped first
            engine.prepare_weights(sorted({layer["initializer"] for layer in graph_map.values()}))
            _prepared.add(engine)
        engine.merge_weights(updates)
        if "deepcache" not in getattr(loras, "denoiser_kinds", {"deepcache"}):
            engine.unload()  # a first merge may load it (ONNX Runtime fills its cache); not in use: its weights stay
