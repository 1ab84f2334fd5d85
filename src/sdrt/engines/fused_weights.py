"""LoRAs on fused graph variants (`sdrt optimize`): each weight of the export's graph found in the fused graph, so a
LoRA's terms (named after the export's initializers, weight_merge.py) are merged into the fused graph's own.

The fusions keep most weights as they were (same values, often the same names; cast to fp16 for CUDA) and pack
some: ONNX Runtime's Attention takes one (in, 3 * out) weight whose columns are [q | k | v]. Each weight of the
export's graph is found by value, once, in one of those forms: "same" (its values, in the fused graph's dtype)
or "cols" (a column block of a packed 2-D initializer). Terms then translate exactly: a low-rank update of a
column block is a low-rank update of the packed weight whose right factor is zero outside the block (the blocks
of q, k and v side by side make one product of their stacked factors), and a whole array is placed in a zero
array of the packed shape. Weights found in no such form (CUDA's per-head interleaved QKV, NhwcConv's OHWI
filters) are refused by name: such a model takes LoRAs on its unfused graphs.
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
                    column_digests[key] = _column_blocks(fused, key)
                found = column_digests[key].get(_digest(weight))
                if found is None:
                    found = column_digests[key].get(_digest(weight.astype(np.float16)))
                places[name] = [found[0], "cols", found[1]] if found else None
    finally:
        source.close()
        fused.close()
    return places


def _column_blocks(fused: OnnxWeights, shape: tuple) -> dict[str, tuple]:
    """{digest of a (rows, cols) column block: (packed initializer, column offset)} of FUSED's 2-D initializers of
    shape (rows, k * cols), k > 1."""
    rows, cols = shape
    out = {}
    for name, info in fused.initializers.items():
        if len(info.shape) == 2 and info.shape[0] == rows and info.shape[1] > cols and info.shape[1] % cols == 0:
            value = fused.read(name)
            for offset in range(0, info.shape[1], cols):
                out.setdefault(_digest(value[:, offset : offset + cols]), (name, offset))
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
            rows, width = self.shapes[place[0]]
            offset = place[2]
            for term in updates[name]:
                if isinstance(term, LowRank):
                    right = np.zeros((term.right.shape[0], width), np.float32)
                    right[:, offset : offset + term.right.shape[1]] = term.right
                    target.append(LowRank(term.left, right))
                else:
                    whole = np.zeros((rows, width), np.float32)
                    block = np.asarray(term, np.float32).reshape(rows, -1)
                    whole[:, offset : offset + block.shape[1]] = block
                    target.append(whole)
        return out
