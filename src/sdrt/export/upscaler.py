"""`sdrt export-upscaler FILE -o DIR`: an ESRGAN-family upscaler (.pth/.pt/.ckpt through torch's weights-only
unpickler, or .safetensors) -> DIR/model.onnx + DIR/upscaler.json (runtime/upscale.py reads both).

The architectures are sdrt's own torch modules (upscaler_arch.py), detected from the state dict's keys: RRDBNet
(ESRGAN, old and Real-ESRGAN key layouts: RealESRGAN x4plus / x2plus / anime_6B, 4x-UltraSharp, ...),
SRVGGNetCompact (realesr-general-x4v3, realesr-animevideov3), SwinIR, Swin2SR and HAT. A file of another
architecture goes through spandrel where the optional extra installed it (upscaler_spandrel.py), else it is refused,
naming what is supported and how to install spandrel.
"""

import json
import sys
import warnings
from pathlib import Path

import numpy as np

from sdrt.errors import InvalidOption, ModelError
from sdrt.runtime.upscale import (
    DEFAULT_TILE,
    DEFAULT_TILE_OVERLAP,
    UPSCALER_FORMAT,
    UPSCALER_INPUT,
    UPSCALER_MANIFEST,
    UPSCALER_MODEL,
    UPSCALER_OUTPUT,
    UPSCALER_VERSION,
)

OPSET = 17
SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")
SUPPORTED = "ESRGAN/RRDBNet (old and Real-ESRGAN layouts), Real-ESRGAN's SRVGGNetCompact, SwinIR, Swin2SR or HAT"
VERIFY_SIZE = 20  # pixels: the side of the random image the graph is checked on against the torch module
VERIFY_TOLERANCE = 1e-3  # max |graph - torch| on [0, 1] outputs (1/255 is 3.9e-3)
NESTED_KEYS = ("params_ema", "params", "state_dict", "model")  # BasicSR and trainer checkpoints nest the weights


def load_upscaler(path: Path):
    """(torch module in eval mode, upscaler_arch.Arch) of the upscaler file PATH."""
    from sdrt.export import upscaler_arch
    from sdrt.export.sources import load_weights

    if not path.is_file():
        raise InvalidOption("FILE", str(path), "an existing upscaler file (" + ", ".join(SUFFIXES) + ")")
    if path.suffix.lower() not in SUFFIXES:
        raise InvalidOption("FILE", str(path), "an upscaler file: " + ", ".join(SUFFIXES))
    state = _unnest(load_weights(path) if path.suffix.lower() == ".safetensors" else _pickled(path))
    try:
        detected = upscaler_arch.detect(state)
    except ValueError as e:
        return _through_spandrel(path, state, f"{e}; sdrt exports {SUPPORTED}")
    if detected is None:
        sample = ", ".join(list(state)[:3]) or "no tensors"
        return _through_spandrel(path, state, f"not an upscaler sdrt can export (keys {sample}, ...): expected "
                                 f"{SUPPORTED}")  # fmt: skip
    arch, state = detected
    model = upscaler_arch.build(arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(
            f"{str(path)!r} looks like {arch.name} but its tensors do not fit it: {str(e)[:300]}"
        ) from None
    return model.eval(), arch


def _through_spandrel(path: Path, state: dict, why: str):
    """(module, arch) of a file sdrt's own modules do not export, through spandrel where it is installed (the optional
    `spandrel` export extra: upscaler_spandrel.py); else the error WHY, naming how to install it."""
    from sdrt.export import upscaler_spandrel

    if not upscaler_spandrel.available():
        raise ModelError(f"{str(path)!r}: {why}; {upscaler_spandrel.INSTALL}")
    loaded = upscaler_spandrel.load(state, str(path))
    if loaded is None:
        raise ModelError(f"{str(path)!r}: {why}; spandrel detects no architecture in it either")
    return loaded


def _pickled(path: Path) -> dict:
    from sdrt.export.sources import load_pickled

    return load_pickled(path)[0]


def _unnest(state: dict) -> dict:
    """The tensors of STATE, unwrapping BasicSR's params_ema / params (the EMA weights first, as Real-ESRGAN does)."""
    import torch

    for key in NESTED_KEYS:
        if isinstance(state.get(key), dict):
            return _unnest(state[key])
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def export_upscaler(source, out_dir, overwrite: bool = False, name: str | None = None) -> dict:
    """Export the upscaler file SOURCE to OUT_DIR (model.onnx + upscaler.json), atomically; its manifest."""
    import torch

    from sdrt.export.driver import staged_folder
    from sdrt.export.sources import file_sha256
    from sdrt.version import __version__

    path, out_dir = Path(source), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InvalidOption("--output", str(out_dir), "a folder that does not exist yet (or pass --overwrite)")
    model, arch = load_upscaler(path)
    loader = getattr(arch, "loader", "sdrt")  # "spandrel X.Y.Z" for the architectures sdrt has no module for
    sizes = f", {arch.blocks} blocks of {arch.features} features" if arch.blocks else f" (through {loader})"
    print(f"{path.name}: {arch.name} x{arch.scale}{sizes}", file=sys.stderr)
    with staged_folder(out_dir) as staging:
        multiple = getattr(arch, "size_multiple", getattr(arch, "window", getattr(arch, "unshuffle", 1)))
        side = max(VERIFY_SIZE, getattr(arch, "minimum_size", 0))
        side = -(-side // multiple) * multiple  # the check's image: sides a multiple of what the net needs
        seeded = torch.Generator().manual_seed(0)
        x = torch.rand(1, arch.in_channels, side, side, generator=seeded)
        other = torch.rand(1, arch.in_channels, side + multiple, side + 2 * multiple, generator=seeded)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes; the check against the torch module is what counts
            axes = {UPSCALER_INPUT: {0: "batch", 2: "height", 3: "width"},
                    UPSCALER_OUTPUT: {0: "batch", 2: "out_height", 3: "out_width"}}  # fmt: skip
            torch.onnx.export(model, (x,), str(staging / UPSCALER_MODEL), input_names=[UPSCALER_INPUT],
                              output_names=[UPSCALER_OUTPUT], opset_version=OPSET, dynamo=False,
                              dynamic_axes=axes)  # fmt: skip
            expected, expected_other = model(x).numpy(), model(other).numpy()
        error = _verify(staging / UPSCALER_MODEL, x.numpy(), expected)
        error = max(error, _verify(staging / UPSCALER_MODEL, other.numpy(), expected_other))  # another size
        manifest = {
            "format": UPSCALER_FORMAT,
            "version": UPSCALER_VERSION,
            "name": name or path.stem,
            "architecture": arch.name,
            "scale": arch.scale,
            "in_channels": arch.in_channels,
            "out_channels": arch.out_channels,
            "size_multiple": multiple,  # input sides are padded to a multiple of this
            "minimum_size": getattr(arch, "minimum_size", 0),  # and up to this (spandrel's size requirement)
            "channel_order": "BGR",  # A1111 feeds ESRGAN-family and SwinIR models BGR
            "tiling": "average" if arch.name == "SwinIR" else "grid",  # A1111: SwinIR's tiled_upscale_2
            "tile": DEFAULT_TILE,
            "tile_overlap": DEFAULT_TILE_OVERLAP,
            "features": arch.features,
            "blocks": arch.blocks,
            "source": {"file": path.name, "sha256": file_sha256(path).hexdigest(), "loader": loader},
            "verified_max_error": float(error),
            "sdrt_version": __version__,
        }
        (staging / UPSCALER_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _verify(graph: Path, x: np.ndarray, expected: np.ndarray) -> float:
    """The graph's max |difference| from the torch module's output on X; a larger one than VERIFY_TOLERANCE fails."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    got = session.run(None, {UPSCALER_INPUT: x})[0]
    error = float(np.abs(got - expected).max())
    if got.shape != expected.shape or not error <= VERIFY_TOLERANCE:
        raise ModelError(
            f"the exported upscaler graph differs from the torch module by {error:.3g} (shape {got.shape})"
        )
    return error
