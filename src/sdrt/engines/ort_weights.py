"""Initializers that an ONNX Runtime CPU session reads from buffers of the engine's own, rewritten in place.

The session is made from ONNX Runtime's optimised graph (the per-machine cache) with these initializers passed as
SessionOptions.add_initializer values over the engine's buffers, and without prepacking, so every kernel reads
them at run time: new values are then copies, or merges (weight_merge.py), into the buffers, and no session is
built. The buffers are in the optimised graph's layout (nchwc.py: ONNX Runtime re-lays convolution filters out
for its NCHWc kernels); each one's base value is a read-only memory map of the optimised graph's bytes (kept by
the page cache, not copied into the process), so the file's values come back exactly without parsing the model
again. A new buffer is not filled when it is made: the merge that follows writes base + terms into it in one pass
(or the base alone, for a buffer the merge leaves out), so a first LoRA costs what a switch costs plus one session
(the kernels read the buffers at run time only, and no run happens between the two).
"""

from pathlib import Path

import numpy as np

from sdrt.engines import nchwc
from sdrt.engines.onnx_weights import OnnxWeights
from sdrt.engines.weight_merge import merge_all


class LiveWeights:
    """The replaceable initializers of one session over OPTIMISED_FILE (the cached optimised graph of MODEL_FILE)."""

    def __init__(self, model_file: Path, optimised_file: Path, threads: int):
        self.model_file, self.optimised_file, self.threads = Path(model_file), Path(optimised_file), threads
        self.buffers: dict[str, np.ndarray] = {}  # file initializer -> the buffer the session reads
        self.base: dict[str, np.ndarray] = {}  # file initializer -> its value in the optimised graph (a read-only map)
        self.slots: dict[str, tuple[str, str]] = {}  # file initializer -> (optimised-graph initializer, layout)
        self.shapes: dict[str, tuple] = {}  # file initializer -> its shape in the model file
        self.changed: set[str] = set()  # buffers that differ from their base
        self.unfilled: set[str] = set()  # buffers made but not written yet (the next write or merge fills them)

    def cover(self, names) -> bool | None:
        """Make NAMES replaceable. True: new buffers were made (the session is to be made again, with overrides());
        False: all were already; None: some name has no known place in the optimised graph (nothing changed)."""
        new = sorted(set(names) - self.buffers.keys())
        if not new:
            return False
        slots = nchwc.find_slots(self.model_file, self.optimised_file, new)
        if any(slots.get(name) is None for name in new):
            return None
        source, graph = OnnxWeights(self.model_file), OnnxWeights(self.optimised_file)
        try:
            for name in new:
                slot, layout = slots[name]
                self.base[name] = graph.view(slot)
                self.buffers[name] = np.empty(self.base[name].shape, self.base[name].dtype)
                self.slots[name] = (slot, layout)
                self.shapes[name] = source.initializers[name].shape
        finally:
            source.close()
            graph.close()
        self.unfilled.update(new)
        return True

    def overrides(self) -> dict:
        """{optimised-graph initializer: OrtValue over the engine's buffer}, for the session's options."""
        import onnxruntime as ort

        return {self.slots[name][0]: ort.OrtValue.ortvalue_from_numpy(buffer) for name, buffer in self.buffers.items()}

    def write(self, weights: dict[str, np.ndarray]) -> None:
        """Buffers = WEIGHTS (the model file's layout); other buffers changed before get their base back."""
        for name in (self.changed | self.unfilled) - weights.keys():
            np.copyto(self.buffers[name], self.base[name])
        for name, array in weights.items():
            nchwc.write_layout(self.buffers[name], array, self.slots[name][1])
        self.changed, self.unfilled = set(weights), set()

    def merge(self, updates: dict[str, list]) -> None:
        """Buffers = base + UPDATES' terms (weight_merge); other buffers changed before get their base back."""
        jobs = [(self.buffers[name], self.base[name], self.slots[name][1], self.shapes[name], terms)
                for name, terms in updates.items()]  # fmt: skip
        jobs += [(self.buffers[name], self.base[name], "same", self.shapes[name], ())
                 for name in (self.changed | self.unfilled) - updates.keys()]  # fmt: skip
        merge_all(jobs, self.threads)
        self.changed, self.unfilled = {name for name, terms in updates.items() if terms}, set()
