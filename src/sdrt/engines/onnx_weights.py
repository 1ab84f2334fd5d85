"""The initializers of an ONNX file, read without the onnx package and without loading the whole model.

Only the few protobuf fields that locate a weight are decoded (onnx.proto: ModelProto.graph = 7,
GraphProto.initializer = 5; TensorProto dims = 1, data_type = 2, float_data = 4, name = 8, raw_data = 9,
external_data = 13 with key = 1 / value = 2, data_location = 14). The file is memory-mapped, so a lookup costs
the protobuf walk, and reading a weight copies just that weight (from the file or its external data file).
"""

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# TensorProto.DataType -> numpy dtype (bfloat16: read as the high halves of float32, see _decode)
ONNX_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64, 16: "bf16", 6: np.int32, 7: np.int64}


@dataclass(frozen=True)
class Initializer:
    """Where one initializer's values are: inline (offset into the .onnx file) or in an external data file."""

    name: str
    shape: tuple[int, ...]
    dtype: object  # numpy dtype, or "bf16"
    location: str | None  # external data file, relative to the .onnx file; None: inline raw_data
    offset: int  # byte offset of the little-endian values (raw_data or packed float_data) or in the data file
    length: int  # bytes; -1: to the end of the data file

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bf16" else np.dtype(self.dtype).itemsize


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or (offset, length)) of each field of the message in BUF[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield number, wire, (pos, length)
            pos += length
        elif wire == 1:
            yield number, wire, buf[pos : pos + 8]
            pos += 8
        elif wire == 5:
            yield number, wire, buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")


def _tensor(buf, start: int, end: int) -> Initializer | None:
    name, shape, dtype, raw, location, ext_offset, ext_length, floats = "", [], 1, None, None, 0, -1, None
    for number, wire, value in _fields(buf, start, end):
        if number == 1:
            if wire == 0:
                shape.append(value)
            else:  # packed dims
                pos, stop = value[0], value[0] + value[1]
                while pos < stop:
                    dim, pos = _varint(buf, pos)
                    shape.append(dim)
        elif number == 2:
            dtype = value
        elif number == 8:
            name = bytes(buf[value[0] : value[0] + value[1]]).decode()
        elif number == 9:
            raw = value
        elif number == 4 and wire == 2:
            floats = value
        elif number == 13:
            entry = {}
            for n, _, (pos, length) in _fields(buf, value[0], value[0] + value[1]):
                entry[n] = bytes(buf[pos : pos + length]).decode()
            key, val = entry.get(1), entry.get(2, "")
            if key == "location":
                location = val
            elif key == "offset":
                ext_offset = int(val)
            elif key == "length":
                ext_length = int(val)
    if dtype not in ONNX_DTYPES:
        return None
    np_dtype = ONNX_DTYPES[dtype]
    if location is not None:
        return Initializer(name, tuple(shape), np_dtype, location, ext_offset, ext_length)
    if raw is not None:
        return Initializer(name, tuple(shape), np_dtype, None, raw[0], raw[1])
    if floats is not None and np_dtype == np.float32:
        return Initializer(name, tuple(shape), np_dtype, None, floats[0], floats[1])
    return None


class OnnxWeights:
    """The float initializers of MODEL_FILE by name; `read(name)` returns a copy of one as a numpy array."""

    def __init__(self, model_file):
        self.model_file = Path(model_file)
        with open(self.model_file, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = memoryview(self._map)
        self.initializers: dict[str, Initializer] = {}
        try:
            for number, wire, value in _fields(buf, 0, len(buf)):
                if number == 7 and wire == 2:  # ModelProto.graph
                    for n, w, (pos, length) in (f for f in _fields(buf, value[0], value[0] + value[1]) if f[1] == 2):
                        if n == 5 and w == 2:  # GraphProto.initializer
                            tensor = _tensor(buf, pos, pos + length)
                            if tensor is not None:
                                self.initializers[tensor.name] = tensor
        except (IndexError, ValueError, UnicodeDecodeError, struct.error) as e:
            raise ValueError(f"{self.model_file}: not a readable ONNX file ({e})") from None
        finally:
            buf.release()

    def __contains__(self, name: str) -> bool:
        return name in self.initializers

    def raw(self, name: str) -> bytes:
        """The initializer's bytes as stored (little-endian)."""
        info = self.initializers[name]
        if info.location is None:
            return self._map[info.offset : info.offset + info.length]
        data_file = self.model_file.parent / info.location
        if data_file.parent.resolve() != self.model_file.parent.resolve():
            raise ValueError(f"{self.model_file}: external data {info.location!r} lies outside the model's folder")
        with open(data_file, "rb") as f:
            f.seek(info.offset)
            return f.read(info.length) if info.length >= 0 else f.read()

    def read(self, name: str) -> np.ndarray:
        info = self.initializers[name]
        return _decode(self.raw(name), info.dtype, info.shape)

    def view(self, name: str) -> np.ndarray:
        """The initializer as a read-only memory map of its bytes in the file (nothing is read until used): for
        values kept for long and read rarely, which then live in the page cache rather than the process's memory."""
        info = self.initializers[name]
        if info.dtype == "bf16" or np.dtype(info.dtype).byteorder == ">":
            return self.read(name)
        path = self.model_file if info.location is None else self.model_file.parent / info.location
        if path.parent.resolve() != self.model_file.parent.resolve():
            raise ValueError(f"{self.model_file}: external data {info.location!r} lies outside the model's folder")
        count = int(np.prod(info.shape, dtype=np.int64))
        if count == 0:
            return np.zeros(info.shape, info.dtype)
        return np.memmap(path, dtype=info.dtype, mode="r", offset=info.offset, shape=info.shape)

    def close(self) -> None:
        self._map.close()


def _decode(raw: bytes, dtype, shape: tuple) -> np.ndarray:
    if dtype == "bf16":
        halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).astype(dtype)


def read_initializers(model_file, names) -> dict[str, np.ndarray]:
    """Copies of the named initializers of MODEL_FILE (+ its external data), as stored there."""
    graph = OnnxWeights(model_file)
    try:
        return {name: graph.read(name) for name in names}
    finally:
        graph.close()
