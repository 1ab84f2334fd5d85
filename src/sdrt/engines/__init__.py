"""Backends behind one small seam: load, run(feeds) -> outputs named as in the ONNX graph, unload."""

from pathlib import Path
from typing import Protocol

import numpy as np

BACKENDS = ("cpu",)


class Engine(Protocol):
    input_names: list[str]
    output_names: list[str]

    def load(self) -> None: ...

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def unload(self) -> None: ...


def create_engine(model_file: Path, backend: str) -> Engine:
    """An unloaded engine for MODEL_FILE on BACKEND (one of BACKENDS)."""
    if backend == "cpu":
        from sdrt.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(model_file, providers=["CPUExecutionProvider"])
    from sdrt.runtime.errors import InvalidOption

    raise InvalidOption("backend", backend, ", ".join(BACKENDS))
