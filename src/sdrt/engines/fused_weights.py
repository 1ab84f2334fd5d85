"""LoRAs on fused graph variants (`sdrt optimize`): each weight of the export's graph found in the fused graph, so a
LoRA's terms (named after the export's initializers, weight_merge.py) are merged into the fused graph's own.

The fusions keep most weights as they were (same values, often the same names; cast to fp16 for CUDA) and pack
or re-lay out some. Each weight of the export's graph is found by value, once, in one of these forms (in the fused
graph's dtype):

- "same": its values;
- "cols", offset: a column block of a packed 2-D initializer (the CPU Attention's (in, 3 * out) [q | k | v]);
- "heads", k, h, s: slot s of k per-head interleaved weights (CUDA's MultiHeadAttention with packed QKV, k = 3, or
  KV, k = 2: columns (head, slot, h), onnxruntime.transformers' fusion_attention_unet), h the head size;
- "ohwi": a convolution filter (O, I, kh, kw) laid out (O, kh, kw, I) for NhwcConv.

Terms then translate exactly: a low-rank update of some columns of a packed weight is a low-rank update of the
whole whose right factor is zero elsewhere (the blocks of q, k and v side by side make one product of their
stacked factors); an OHWI filter's update is the same left factor times the right one's columns in (kh, kw, I)
order; a whole array is placed (or transposed) into a zero array of the fused shape. A weight found in no such
form is refused by name: such a model takes LoRAs on its unfused graphs.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from sdrt.engines.onnx_weights import OnnxWeights
from sdrt.engines.weight_merge import LowRank
from sdrt.errors import ModelError

PLACES_FORMAT = "sdrt-fused-weights"


def _digest(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


def find_places(export_file: Path, fused_file: Path, names) -> dict:
    """{initializer of EXPORT_FILE: [fused initializer, "same"] or [packed initializer, "cols", offset] or None}."""
    source, fused = OnnxWeights(export_file), OnnxWeights(fused_file)
    try:
        by_shape: dict[tuple, list[str]] = {}
        for name, info in fused.initializers.items():
            by_shape.setdefault(info.shape, []).append(name)
        digests: dict[str, str] = {}  # fused initializer -> digest (read once)
        column_digests: dict[tuple, dict[str, tuple]] = {}  # (rows, cols) -> {digest: (packed, offset)}
        places = {}
        for name in names:
            weight = source.read(name)
            places[name] = None
            for candidate in by_shape.get(weight.shape, []):
                info = fused.initializers[candidate]
                if candidate not in digests:
                    digests[candidate] = _digest(fused.read(candidate))
                if digests[candidate] == _digest(weight.astype(info.dtype)):
                    places[name] = [candidate, "same"]
                    break
            if places[name] is None and weight.ndim == 2:
                key = weight.shape
                if key not in column_digests:
                    column_digests[key] = {**_head_blocks(fused, key), **_column_blocks(fused, key)}
                found = column_digests[key].get(_digest(weight))
                if found is None:
                    found = column_digests[key].get(_digest(weight.astype(np.float16)))
                places[name] = list(found) if found else None
            if places[name] is None and weight.ndim == 4:
                ohwi = weight.transpose(0, 2, 3, 1)
                for candidate in by_shape.get(ohwi.shape, []):
                    if _digest(fused.read(candidate)) == _digest(ohwi.astype(fused.initializers[candidate].dtype)):
                        places[name] = [candidate, "ohwi"]
                        break
    finally:
        source.close()
        fused.close()
    return places


def _packed(fused: OnnxWeights, shape: tuple):
    """(name, value, k) of FUSED's 2-D initializers of shape (rows, k * cols), k > 1, for SHAPE (rows, cols)."""
    rows, cols = shape
    for name, info in fused.initializers.items():
        if len(info.shape) == 2 and info.shape[0] == rows and info.shape[1] > cols and info.shape[1] % cols == 0:
            yield name, fused.read(name), info.shape[1] // cols


def _column_blocks(fused: OnnxWeights, shape: tuple) -> dict[str, tuple]:
    """{digest of a (rows, cols) column block: (packed initializer, "cols", column offset)} of FUSED's packed
    2-D initializers."""
    cols = shape[1]
    out = {}
    for name, value, _ in _packed(fused, shape):
        for offset in range(0, value.shape[1], cols):
            out.setdefault(_digest(value[:, offset : offset + cols]), (name, "cols", offset))
    return out


def _head_blocks(fused: OnnxWeights, shape: tuple) -> dict[str, tuple]:
    """{digest of a (rows, cols) weight: (packed initializer, "heads", k, h, slot)} for FUSED's packed 2-D
    initializers read as (rows, cols / h heads, k slots, h), for every head size h dividing cols (h = cols is a
    column block: left to _column_blocks)."""
    rows, cols = shape
    out = {}
    for name, value, k in _packed(fused, shape):
        for h in (h for h in range(1, cols) if cols % h == 0):
            heads = value.reshape(rows, cols // h, k, h)
            for slot in range(k):
                out.setdefault(_digest(heads[:, :, slot, :]), (name, "heads", k, h, slot))
    return out


class FusedPlaces:
    """Where the export's weights are in one fused graph (found once, kept beside it when the folder is writable)."""

    def __init__(self, export_file: Path, fused_file: Path):
        self.export_file, self.fused_file = Path(export_file), Path(fused_file)
        self.file = self.fused_file.with_suffix(".weights.json")  # unet/model.cpu.weights.json
        self.places: dict = {}
        self.shapes: dict[str, tuple] = {}  # fused initializer -> shape
        try:
            data = json.loads(self.file.read_text())
            if data.get("format") == PLACES_FORMAT and data.get("fused_size") == self.fused_file.stat().st_size:
                self.places = data["places"]
        except (OSError, ValueError, AttributeError):
            pass

    def place(self, names) -> dict:
        missing = [name for name in names if name not in self.places]
        if missing:
            self.places.update(find_places(self.export_file, self.fused_file, missing))
            data = {"format": PLACES_FORMAT, "fused_size": self.fused_file.stat().st_size, "places": self.places}
            try:
                self.file.write_text(json.dumps(data))
            except OSError:  # a read-only model folder: found again next time
                pass
        unplaced = [name for name in names if self.places.get(name) is None]
        if unplaced:
            raise ModelError(f"LoRAs: the fused graph {self.fused_file.name} holds {unplaced[0]} in a form sdrt cannot "
                             "merge into (packed per head, or re-laid out): load the model with fused=False to use "
                             "LoRAs")  # fmt: skip
        if not self.shapes:
            graph = OnnxWeights(self.fused_file)
            self.shapes = {name: info.shape for name, info in graph.initializers.items()}
            graph.close()
        return {name: self.places[name] for name in names}

    def translate(self, updates: dict[str, list]) -> dict[str, list]:
        """UPDATES {export initializer: [terms]} as {fused initializer: [terms]} (weight_merge terms)."""
        out: dict[str, list] = {}
        for name, place in self.place(list(updates)).items():
            target = out.setdefault(place[0], [])
            if place[1] == "same":
                target.extend(updates[name])
                continue
            shape = self.shapes[place[0]]
            target.extend(_translated(term, place, shape) for term in updates[name])
        return out


def _translated(term, place: list, shape: tuple):
    """A weight_merge TERM of an export weight as the term of the fused initializer of SHAPE that holds it at PLACE
    (find_places' "cols", "heads" or "ohwi")."""
    low = isinstance(term, LowRank)
    if place[1] == "ohwi":  # columns (i, kh, kw) -> (kh, kw, i)
        out_ch, kh, kw, in_ch = shape
        if low:
            right = term.right.reshape(-1, in_ch, kh, kw).transpose(0, 2, 3, 1)
            return LowRank(term.left, np.ascontiguousarray(right).reshape(term.right.shape[0], -1))
        return np.ascontiguousarray(np.asarray(term, np.float32).reshape(out_ch, in_ch, kh, kw).transpose(0, 2, 3, 1))
    rows, width = shape
    factor = term.right if low else np.asarray(term, np.float32).reshape(rows, -1)  # (r or rows, cols)
    placed = np.zeros((factor.shape[0], width), np.float32)
    if place[1] == "cols":
        placed[:, place[2] : place[2] + factor.shape[1]] = factor
    else:  # "heads": columns (head, slot, h)
        k, h, slot = place[2:]
        placed.reshape(factor.shape[0], -1, k, h)[:, :, slot, :] = factor.reshape(factor.shape[0], -1, h)
    return LowRank(term.left, placed) if low else placed
