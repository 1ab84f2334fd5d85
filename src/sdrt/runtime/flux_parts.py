"""FLUX.1's transformer as a chain of part graphs (export/flux_parts.py: a 12 B transformer exported part by part
within 24 GB), run one after another; with low-VRAM staging each part is one staged engine, loaded in turn.

Part 0 takes the transformer's inputs (flow_specs.flux_transformer_spec) and runs the embedders, the rotary position
embedding and its first blocks; it returns the image and text streams, the time/guidance/pooled embedding `temb` and
the rotary cos/sin. Later parts take the streams, temb and rotary tables; the last one ends with the output norm and
projection and returns out_sample. Blocks are FLUX's double-stream blocks, then its single-stream ones.
"""

import numpy as np

from sdrt.errors import ModelError
from sdrt.runtime.flow_specs import TRANSFORMER, flux_transformer_spec, t5_part_name
from sdrt.runtime.modelspec import ModelSpec, TensorSpec

SHARED = ("temb", "rotary_cos", "rotary_sin")  # what part 0 computes once for every later part


def part_name(index: int) -> str:
    """The model name of the transformer's part INDEX ("transformer", "transformer_part1", ...)."""
    return t5_part_name(TRANSFORMER, index)


def flux_part_spec(index: int, count: int, packed: int, joint: int, pooled: int, guided: bool, width: int,
                   head_dim: int) -> ModelSpec:  # fmt: skip
    """Part INDEX of COUNT. PACKED: packed latent channels, JOINT: T5 width, POOLED: CLIP-L pooled width, WIDTH: the
    transformer's, HEAD_DIM: the rotary tables' width (one attention head)."""
    first, last = index == 0, index == count - 1
    stream = (TensorSpec("hidden_states", "float32", ("batch", "image_tokens", width)),
              TensorSpec("encoder_hidden_states", "float32", ("batch", "tokens", width)))  # fmt: skip
    shared = (TensorSpec("temb", "float32", ("batch", width)),
              TensorSpec("rotary_cos", "float32", ("all_tokens", head_dim)),
              TensorSpec("rotary_sin", "float32", ("all_tokens", head_dim)))  # fmt: skip
    inputs = flux_transformer_spec(packed, joint, pooled, guided).inputs if first else stream + shared
    if last:
        outputs = (TensorSpec("out_sample", "float32", ("batch", "image_tokens", packed)),)
    else:
        outputs = (TensorSpec("hidden_out", "float32", ("batch", "image_tokens", width)),
                   TensorSpec("context_out", "float32", ("batch", "tokens", width)))  # fmt: skip
        outputs += shared if first else ()
    return ModelSpec(part_name(index), inputs=tuple(inputs), outputs=outputs)


class TransformerChain:
    """The part graphs run as one transformer: run(feeds) -> {"out_sample": ...}, as the one-graph engine."""

    def __init__(self, engines: dict, manifest):
        count = int(manifest.models[TRANSFORMER].get("parts", 1))
        names = [part_name(i) for i in range(count)]
        missing = [n for n in names if n not in engines]
        if missing:
            raise ModelError(f"{manifest.folder}: the transformer's parts {missing} are not loaded")
        self.engines = [engines[n] for n in names]

    def run(self, feeds: dict) -> dict:
        out = self.engines[0].run(feeds)
        shared = {name: out[name] for name in SHARED}
        for engine in self.engines[1:]:
            out = engine.run({"hidden_states": out["hidden_out"], "encoder_hidden_states": out["context_out"],
                              **shared})  # fmt: skip
        return {"out_sample": np.asarray(out["out_sample"])}


def transformer_engine(engines: dict, manifest):
    """The transformer as one engine: its graph, or the chain of its parts when it was exported in parts."""
    if int(manifest.models.get(TRANSFORMER, {}).get("parts", 1)) > 1:
        return TransformerChain(engines, manifest)
    return engines[TRANSFORMER]
