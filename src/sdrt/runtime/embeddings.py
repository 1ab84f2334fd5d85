"""Textual inversion embeddings (Gal et al. 2022), read without torch and without running any pickled code.

Formats: A1111's `.pt` ({"string_to_param": {"*": (n, C)}}), diffusers' `learned_embeds.bin`/`.safetensors`
({token: (C,) or (n, C)}), kohya's `{"emb_params": (n, C)}`, and SDXL's `{"clip_l": (n, 768), "clip_g":
(n, 1280)}`. An embedding is used by its file name in a prompt, as in A1111: the name's tokens are replaced by
the embedding's n vectors.
"""

import hashlib
import io
import json
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import regex

from sdrt.errors import InvalidOption

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
MAX_EMBEDDING_BYTES = 64 * 2**20  # textual inversions are a few KB; refuse anything absurd before reading it
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": "bf16"}
_REFERENCE = regex.compile(r"\bembedding:([\w.\-]+)")
_TORCH_STORAGES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64}


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: dict = field(hash=False)  # width C -> (n, C) float32; one entry per text encoder width
    shorthash: str = ""  # A1111's: the first 12 hex digits of the file's sha256

    @property
    def length(self) -> int:
        """Tokens the embedding takes in a prompt."""
        return len(next(iter(self.vectors.values())))

    def vectors_for(self, width: int) -> np.ndarray:
        if width not in self.vectors:
            widths = ", ".join(str(w) for w in self.vectors)
            allowed = f"an embedding for text encoders of width {width} (it has {widths})"
            raise InvalidOption("embedding", self.name, allowed)
        return self.vectors[width]


class EmbeddingDB:
    """Loaded embeddings by name, found in token streams as A1111's EmbeddingDatabase finds them."""

    def __init__(self, embeddings=()):
        self.by_name: dict[str, Embedding] = {}
        self._lookup: dict[int, dict] = {}  # id(tokenizer) -> {first token id: [(ids, embedding)] longest first}
        for embedding in embeddings:
            self.add(embedding)

    def add(self, embedding: Embedding) -> None:
        self.by_name[embedding.name] = embedding
        self._lookup.clear()

    def load_dir(self, folder) -> "EmbeddingDB":
        """Every embedding file directly in FOLDER."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InvalidOption("embeddings", str(folder), "a folder of .pt, .bin or .safetensors embeddings")
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file():
                self.add(load_embedding(path))
        return self

    def resolve_references(self, text: str) -> str:
        """ComfyUI's explicit "embedding:NAME" (NAME may end in a file suffix) -> NAME; an unknown NAME is an error.

        Plain words are matched against the loaded names as in A1111, where an unknown name is just text.
        """
        def name_of(match) -> str:
            name = match.group(1).rstrip(".")
            for suffix in EMBEDDING_SUFFIXES:
                name = name.removesuffix(suffix)
            if name not in self.by_name:
                loaded = ", ".join(sorted(self.by_name)) or "none loaded"
                raise InvalidOption("prompt", match.group(0), f"an embedding that is loaded ({loaded})")
            return name

        return _REFERENCE.sub(name_of, text) if "embedding:" in text else text

    def find_at(self, tokenizer, tokens: list[int], position: int):
        """(embedding, its length in prompt tokens) starting at TOKENS[POSITION], or (None, None)."""
        if not self.by_name:
            return None, None
        table = self._lookup.get(id(tokenizer))
        if table is None:
            table = {}
            for embedding in self.by_name.values():
                ids = tokenizer.encode(embedding.name)
                if ids:
                    table.setdefault(ids[0], []).append((ids, embedding))
            for candidates in table.values():
                candidates.sort(key=lambda c: -len(c[0]))
            self._lookup[id(tokenizer)] = table
        for ids, embedding in table.get(tokens[position], ()):
            if tokens[position : position + len(ids)] == ids:
                return embedding, len(ids)
        return None, None


def load_embedding(path) -> Embedding:
    """Read one embedding file; a file that is not one is refused with InvalidOption naming it."""
    path = Path(path)
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise InvalidOption("embedding", str(path), "a .pt, .bin or .safetensors file")
    if path.stat().st_size > MAX_EMBEDDING_BYTES:
        raise InvalidOption("embedding", str(path), f"a file under {MAX_EMBEDDING_BYTES // 2**20} MiB")
    data = path.read_bytes()
    try:
        tensors = read_safetensors(data) if path.suffix.lower() == ".safetensors" else read_torch_zip(data)
    except (ValueError, KeyError, TypeError, struct.error, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise InvalidOption("embedding", str(path), f"a textual inversion file ({e})") from None
    vectors = _vectors(tensors)
    if not vectors:
        raise InvalidOption("embedding", str(path), "a textual inversion file (no (n, C) float tensor found)")
    return Embedding(path.stem, vectors, hashlib.sha256(data).hexdigest()[:12])


def _vectors(tensors: dict) -> dict:
    """width -> (n, C) float32 from the known layouts."""
    if "string_to_param" in tensors:  # A1111
        tensors = tensors["string_to_param"]
    arrays = [v for k, v in tensors.items() if isinstance(v, np.ndarray) and k not in ("step",)]
    if "clip_l" in tensors or "clip_g" in tensors:  # SDXL
        arrays = [tensors[k] for k in ("clip_l", "clip_g") if k in tensors]
    out = {}
    for array in arrays:
        array = np.asarray(array, dtype=np.float32)
        array = array[None] if array.ndim == 1 else array
        if array.ndim == 2 and array.shape[0] >= 1 and np.isfinite(array).all():
            out.setdefault(array.shape[1], array)
    lengths = {len(a) for a in out.values()}
    if len(lengths) > 1:
        raise ValueError(f"vectors of different lengths {sorted(lengths)}")
    return out


def read_safetensors(data: bytes) -> dict:
    """{name: array} of a .safetensors file (8-byte header length, JSON header, raw little-endian data)."""
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise ValueError("truncated safetensors header")
    header = json.loads(data[8 : 8 + header_len])
    body = memoryview(data)[8 + header_len :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            continue
        start, end = info["data_offsets"]
        out[name] = _array(bytes(body[start:end]), dtype, tuple(info["shape"]))
    return out


def _array(raw: bytes, dtype, shape: tuple) -> np.ndarray:
    if dtype == "bf16":  # bfloat16: the high half of a float32
        halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def read_torch_zip(data: bytes) -> dict:
    """{name: array or value} of a torch.save zip file, unpickled with only tensor-rebuilding globals allowed."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    names = archive.namelist()
    pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
    if pkl is None:
        raise ValueError("not a torch zip archive (no data.pkl); legacy torch files are not read")
    prefix = pkl[: -len("data.pkl")]

    def storage(dtype, key: str) -> np.ndarray:
        return _array(archive.read(f"{prefix}data/{key}"), dtype, (-1,))

    result = _TensorUnpickler(archive.read(pkl), storage).load()
    return _flatten(result)


def _flatten(value, prefix: str = "") -> dict:
    """Nested dicts of a torch checkpoint -> {key: array}; the A1111 layout keeps its "string_to_param" level."""
    if not isinstance(value, dict):
        raise ValueError("the file holds no dictionary of tensors")
    out = {}
    for key, item in value.items():
        if isinstance(item, dict) and key == "string_to_param":
            out[key] = {k: v for k, v in item.items() if isinstance(v, np.ndarray)}
        elif isinstance(item, np.ndarray):
            out[str(key)] = item
    return out


class _TensorUnpickler(pickle.Unpickler):
    """Rebuilds torch tensors as numpy arrays; every other global is refused, so no pickled code runs."""

    def __init__(self, data: bytes, storage):
        super().__init__(io.BytesIO(data))
        self._storage = storage

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, hooks, *rest: data
        if module == "torch" and name in _TORCH_STORAGES:
            return _TORCH_STORAGES[name]
        if module == "torch" and name == "BFloat16Storage":
            return "bf16"
        if module == "collections" and name == "OrderedDict":
            return dict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only tensors are read from embedding files")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self._storage(pid[1], str(pid[2]))


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *rest) -> np.ndarray:
    """torch's _rebuild_tensor_v2 on a flat numpy storage."""
    itemsize = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride), writeable=False
    )
    return np.array(view)
