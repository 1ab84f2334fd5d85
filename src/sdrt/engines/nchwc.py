"""Where a model file's initializer lives in ONNX Runtime's optimised graph of it, and in which layout.

ONNX Runtime's CPU optimiser (level ORT_ENABLE_ALL) turns most convolutions into NchwcConv, whose filters it
stores re-laid out under new names (`reorder_token_N`): output channels (and input channels) padded to the
vector block B (8 with AVX2, 16 with AVX-512) and blocked, OIHW -> [O/B][I/B][H][W][Bi][Bo] ("bibo"), or
[O/B][I][H][W][Bo] ("bo") where the input has fewer channels than a block. Other weights keep their names.
The place of each weight is found by value (the file's weight, laid out each way, against the optimised graph's
initializers), once per optimised graph, and kept in a JSON beside it.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from sdrt import cache_files
from sdrt.engines.onnx_weights import OnnxWeights

SLOTS_FILE = "weight_slots.json"
LAYOUTS = ("same", "bibo8", "bo8", "bibo16", "bo16")


def to_layout(weight: np.ndarray, layout: str) -> np.ndarray:
    """WEIGHT (O, I, kh, kw) in the optimised graph's LAYOUT ("same": as it is)."""
    if layout == "same":
        return weight
    block = int(layout.removeprefix("bibo").removeprefix("bo"))
    out_ch, in_ch, kh, kw = weight.shape
    out_pad = -(-out_ch // block) * block
    in_pad = -(-in_ch // block) * block if layout.startswith("bibo") else in_ch
    padded = np.zeros((out_pad, in_pad, kh, kw), weight.dtype)
    padded[:out_ch, :in_ch] = weight
    if layout.startswith("bibo"):  # [O/B][Bo][I/B][Bi][H][W] -> [O/B][I/B][H][W][Bi][Bo]
        blocked = padded.reshape(out_pad // block, block, in_pad // block, block, kh, kw).transpose(0, 2, 4, 5, 3, 1)
    else:  # [O/B][Bo][I][H][W] -> [O/B][I][H][W][Bo]
        blocked = padded.reshape(out_pad // block, block, in_pad, kh, kw).transpose(0, 2, 3, 4, 1)
    return np.ascontiguousarray(blocked).reshape(out_pad, in_pad, kh, kw)


def write_layout(buffer: np.ndarray, weight: np.ndarray, layout: str) -> None:
    """Copy WEIGHT (the file's layout) into BUFFER (the optimised graph's LAYOUT), in one strided pass when no
    channel needs padding (the padding of a padded buffer stays zero)."""
    if layout == "same":
        np.copyto(buffer, weight)
        return
    block = int(layout.removeprefix("bibo").removeprefix("bo"))
    out_ch, in_ch, kh, kw = weight.shape
    if out_ch % block or (layout.startswith("bibo") and in_ch % block):
        np.copyto(buffer, to_layout(weight, layout))
        return
    if layout.startswith("bibo"):
        source = weight.reshape(out_ch // block, block, in_ch // block, block, kh, kw).transpose(0, 2, 4, 5, 3, 1)
    else:
        source = weight.reshape(out_ch // block, block, in_ch, kh, kw).transpose(0, 2, 3, 4, 1)
    np.copyto(buffer.reshape(source.shape), source)


def _digest(data) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def find_slots(model_file: Path, optimised_file: Path, names: list[str]) -> dict:
    """{initializer of MODEL_FILE: [initializer of OPTIMISED_FILE, layout] or None where it is in none}."""
    slots_file = Path(optimised_file).parent / SLOTS_FILE
    try:
        slots = json.loads(slots_file.read_text())
    except (OSError, ValueError):
        slots = {}
    missing = [name for name in names if name not in slots]
    if not missing:
        return slots
    source, optimised = OnnxWeights(model_file), OnnxWeights(optimised_file)
    try:
        by_bytes: dict[int, list[str]] = {}
        for name, info in optimised.initializers.items():
            count = int(np.prod(info.shape, dtype=np.int64))
            by_bytes.setdefault(count * info.itemsize, []).append(name)
        digests: dict[int, dict[str, str]] = {}
        for name in missing:
            slots[name] = None
            if name not in source:
                continue
            weight = source.read(name)
            if name in optimised and optimised.initializers[name].shape == weight.shape:  # kept as it was
                if optimised.raw(name) == weight.astype(weight.dtype.newbyteorder("<")).tobytes():
                    slots[name] = [name, "same"]
                    continue
            # fp16 weights: ONNX Runtime's CPU provider runs most ops in float32, and the optimiser folds the Cast it
            # puts after each weight into a float32 initializer (exact: every fp16 value is a float32 one)
            forms = [weight] + ([weight.astype(np.float32)] if weight.dtype == np.float16 else [])
            for form in forms:
                layouts = ("same", *LAYOUTS[1:]) if form is not weight else LAYOUTS[1:]
                for layout in layouts if form.ndim == 4 else (("same",) if form is not weight else ()):
                    laid = to_layout(form, layout)
                    if laid.nbytes not in by_bytes:
                        continue
                    if laid.nbytes not in digests:
                        digests[laid.nbytes] = {_digest(optimised.raw(n)): n for n in by_bytes[laid.nbytes]}
                    match = digests[laid.nbytes].get(_digest(laid.astype(laid.dtype.newbyteorder("<")).tobytes()))
                    if match is not None and optimised.initializers[match].shape == laid.shape:
                        slots[name] = [match, layout]
                        break
                if slots[name] is not None:
                    break
    finally:
        source.close()
        optimised.close()
    _write_json(slots_file, slots)
    return slots


def _write_json(path: Path, data: dict) -> None:
    try:
        cache_files.write_atomic(path, json.dumps(data).encode())
    except OSError:  # a read-only cache: found again next time
        pass
