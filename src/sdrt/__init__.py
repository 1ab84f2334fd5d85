"""sdrt: Stable Diffusion exported to ONNX/TensorRT, run by a torch-free numpy runtime."""

from sdrt.version import __version__

__all__ = ["ControlNetUnit", "Pipeline", "__version__"]


def __getattr__(name):
    # Lazy so `import sdrt` stays cheap (the CLI's `--help` should not load onnxruntime).
    if name == "Pipeline":
        from sdrt.runtime.pipeline import Pipeline

        return Pipeline
    if name == "ControlNetUnit":
        from sdrt.runtime.controlnet import ControlNetUnit

        return ControlNetUnit
    raise AttributeError(name)
