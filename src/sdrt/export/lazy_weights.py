"""Weights read when a module needs them, never a whole checkpoint at once: safetensors files opened lazily, and
diffusers' own single-file converters (original key layout -> diffusers keys) run once on placeholders that only
record what they do, so each converted tensor is computed later from the few original tensors it needs.

A 12 B FLUX.1 transformer file holds 24 GB in bf16; loading it whole as diffusers' `from_single_file` does would not
fit beside its fp32 export on a 24 GB machine. Here a module is built on the meta device and given real tensors one
part at a time (`fill`), each from `WeightSource.tensor(key)`.
"""

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from sdrt.errors import ModelError


class Deferred(torch.Tensor):
    """A meta tensor standing for a value computed later: RECIPE is ("leaf", key), ("call", func, args, kwargs) or
    ("item", recipe, index). Every torch operation on it gives another Deferred (shapes from the meta device)."""

    recipe: tuple

    @staticmethod
    def __new__(cls, meta: torch.Tensor, recipe: tuple):
        made = torch.Tensor._make_subclass(cls, meta)
        made.recipe = recipe
        return made

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*_metas(args), **_metas(kwargs))
        if not _has_deferred((args, kwargs)):
            return out
        recipe = ("call", func, args, kwargs)
        if isinstance(out, torch.Tensor):
            return Deferred(out, recipe)
        if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
            return type(out)(Deferred(o, ("item", recipe, i)) for i, o in enumerate(out))
        return out  # shapes, sizes, dtypes: plain values


def _metas(value):
    """VALUE with each Deferred as its plain meta tensor (containers walked)."""
    if isinstance(value, Deferred):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, (tuple, list)):
        return type(value)(_metas(v) for v in value)
    if isinstance(value, dict):
        return {k: _metas(v) for k, v in value.items()}
    return value


def _has_deferred(value) -> bool:
    if isinstance(value, Deferred):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_deferred(v) for v in value)
    if isinstance(value, dict):
        return any(_has_deferred(v) for v in value.values())
    return False


def evaluate(value, load: Callable[[str], torch.Tensor], cache: dict):
    """VALUE with every Deferred computed: leaves from LOAD(key), each recipe once per CACHE."""
    if isinstance(value, Deferred):
        return _run(value.recipe, load, cache)
    if isinstance(value, (tuple, list)):
        return type(value)(evaluate(v, load, cache) for v in value)
    if isinstance(value, dict):
        return {k: evaluate(v, load, cache) for k, v in value.items()}
    return value


def _run(recipe: tuple, load, cache: dict):
    key = id(recipe)
    if key not in cache:
        kind = recipe[0]
        if kind == "leaf":
            out = load(recipe[1])
        elif kind == "item":
            out = _run(recipe[1], load, cache)[recipe[2]]
        else:
            _, func, args, kwargs = recipe
            out = func(*evaluate(args, load, cache), **evaluate(kwargs, load, cache))
        cache[key] = (recipe, out)  # the recipe kept alive so its id is not reused
    return cache[key][1]


class SafetensorsFiles:
    """Tensors of one or more .safetensors files, read one at a time (names, shapes and dtypes from the headers)."""

    def __init__(self, files):
        from safetensors import safe_open

        self.files = [Path(f) for f in files]
        self.where, self.handles = {}, []
        for path in self.files:
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise ModelError(f"{str(path)!r} is not a readable .safetensors file ({e})") from None
            self.handles.append(handle)
            for key in handle.keys():
                self.where[key] = handle
            if "scaled_fp8" in self.where:  # ComfyUI's scaled fp8: every weight has a scale to apply
                raise ModelError(f"{str(path)!r} is a scaled-fp8 file (ComfyUI's scaled_fp8): not supported; use its "
                                 "fp16/bf16 (or plain fp8) file")  # fmt: skip

    def keys(self):
        return self.where.keys()

    def meta(self, key: str) -> torch.Tensor:
        sliced = self.where[key].get_slice(key)
        dtype = _DTYPES.get(sliced.get_dtype())
        if dtype is None:
            raise ModelError(f"{key!r} is stored as {sliced.get_dtype()}, which sdrt cannot read (fp32, fp16, bf16)")
        return torch.empty(sliced.get_shape(), dtype=dtype, device="meta")

    def load(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64, "I64": torch.int64,
           "I32": torch.int32, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # fmt: skip


def diffusers_files(folder: Path) -> list[Path]:
    """The .safetensors weight files of a diffusers/transformers model folder (sharded or not)."""
    folder = Path(folder)
    for index in sorted(folder.glob("*.safetensors.index.json")):
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"), key=lambda f: (f.name.count("."), f.name))  # no variant first
    if not files:
        raise ModelError(f"{str(folder)!r} has no .safetensors weights (sdrt reads only safetensors here)")
    return files[:1]


class WeightSource:
    """Diffusers-named tensors of one model: KEYS {diffusers key: Deferred}, computed from FILES when asked."""

    def __init__(self, files: SafetensorsFiles, keys: dict, label: str):
        self.files, self.keys, self.label = files, keys, label

    @classmethod
    def direct(cls, files: SafetensorsFiles, label: str, prefix: str = "") -> "WeightSource":
        """FILES' tensors under PREFIX (removed), as they are: a diffusers-layout file."""
        return cls(files, {k[len(prefix) :]: leaf(files, k) for k in files.keys() if k.startswith(prefix)}, label)

    @classmethod
    def converted(cls, files: SafetensorsFiles, convert: Callable[[dict], dict], label: str, keep=None):
        """FILES' tensors (those KEEP(key) accepts) through CONVERT, one of diffusers' single-file converters."""
        originals = {k: leaf(files, k) for k in files.keys() if keep is None or keep(k)}
        try:
            return cls(files, convert(originals), label)
        except (KeyError, IndexError, RuntimeError, ValueError) as e:
            raise ModelError(
                f"{label}: the file's keys are not the layout expected ({type(e).__name__}: {e})"
            ) from None

    def tensors(self, names, dtype=None) -> dict:
        """{name: tensor} for NAMES, each in DTYPE (the stored one when None). Names are computed block by block
        (by their first two components), each block's original tensors dropped before the next."""
        out, cache, block = {}, {}, None
        for name in names:
            if name.split(".")[:2] != block:
                cache, block = {}, name.split(".")[:2]
            value = evaluate(self.keys[name], self.files.load, cache)
            out[name] = value if dtype is None else value.to(dtype)
        return out


def leaf(files: SafetensorsFiles, key: str) -> Deferred:
    return Deferred(files.meta(key), ("leaf", key))


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built in the `with` block get their parameters on the meta device (each made, initialised and moved
    one layer at a time, so never a whole model in memory); buffers stay real (computed ones: positions, ...)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            made = module._parameters[name]
            module._parameters[name] = type(made)(made.to("meta"), requires_grad=made.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def fill(module: torch.nn.Module, source: WeightSource, prefix: str = "", dtype=None) -> None:
    """Give MODULE's parameters and the persistent buffers SOURCE holds (named PREFIX + name there) real tensors in
    DTYPE (the stored dtype when None; fp8 becomes bf16). A missing key or a wrong shape: one ModelError naming the
    file."""
    params = dict(module.named_parameters())
    # buffers the file lacks keep the values the module computed (position ids, ...)
    state = {n: t for n, t in module.state_dict(keep_vars=True).items() if n in params or prefix + n in source.keys}
    missing = [prefix + n for n in state if prefix + n not in source.keys]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelError(f"{source.label}: weight {missing[0]!r}{more} missing (not this model's file?)")
    tensors = source.tensors([prefix + n for n in state], dtype)
    for name, value in tensors.items():
        expected = state[name[len(prefix) :]]
        if tuple(value.shape) != tuple(expected.shape):
            raise ModelError(f"{source.label}: {name!r} has shape {tuple(value.shape)}, the config says "
                             f"{tuple(expected.shape)} (a config of another model size?)")  # fmt: skip
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            tensors[name] = value.to(torch.bfloat16)
    module.load_state_dict({n[len(prefix) :]: t for n, t in tensors.items()}, strict=False, assign=True)


def drop(module: torch.nn.Module) -> None:
    """Hand MODULE's storage back (its parameters and buffers go to the meta device)."""
    module.to("meta")
