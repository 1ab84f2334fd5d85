"""TensorRT engine files as pure functions: what a serialised engine depends on (EngineIdentity, its cache key),
which built engine serves a request and why another is refused, and what a refit (LoRA) writes. No TensorRT here:
all of it runs in CI."""

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdrt.engines.plan import profile_covers, static_profile
from sdrt.errors import ModelError

# ----------------------------------------------------------------------------------------------- cache keys


@dataclass(frozen=True)
class EngineIdentity:
    """What a serialised TensorRT engine depends on: it runs only on the same GPU generation and TensorRT version."""

    model: str  # "unet", ...
    compute_capability: str  # "8.6"
    trt_version: str  # "10.8.0.43"
    precision: str  # "fp16"
    profile: dict  # plan_profile's result
    source_hash: str  # source_fingerprint of the ONNX file
    options: dict = field(default_factory=dict)  # builder flags that change the engine (weight streaming, refit)

    def to_json(self) -> dict:
        d = asdict(self)
        d["profile"] = {k: [list(s) for s in v] for k, v in self.profile.items()}
        return d

    def key(self) -> str:
        """16 hex digits over every field: a file name under the model's engines/ folder."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, d: dict) -> "EngineIdentity":
        profile = {k: tuple(tuple(s) for s in v) for k, v in d["profile"].items()}
        return cls(**{**d, "profile": profile})


def source_fingerprint(model_file: Path) -> str:
    """sha256 over the ONNX file and its external data: sizes plus the first and last MiB of each (fast on 3 GB)."""
    digest = hashlib.sha256()
    files = [Path(model_file)] + sorted(Path(model_file).parent.glob(Path(model_file).name + ".data"))
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}:".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(2**20))
            if size > 2**21:
                fh.seek(-(2**20), 2)
                digest.update(fh.read())
    return digest.hexdigest()[:32]


def mismatch(meta: EngineIdentity, compute_capability: str, trt_version: str) -> str | None:
    """Why META's engine must not load on this GPU / TensorRT (None if it may)."""
    reasons = []
    if meta.compute_capability != compute_capability:
        reasons.append(f"GPU compute capability {meta.compute_capability}, this GPU is {compute_capability}")
    if meta.trt_version != trt_version:
        reasons.append(f"TensorRT {meta.trt_version}, this is TensorRT {trt_version}")
    return "; ".join(reasons) or None


def select_engine(
    candidates: list[EngineIdentity], model: str, compute_capability: str, trt_version: str, source_hash: str,
    shapes: dict | None = None, model_dir: str = "MODEL_DIR", streaming: bool = False,
) -> EngineIdentity:  # fmt: skip
    """The engine to load for MODEL: built here (same GPU generation and TensorRT), from this ONNX, covering SHAPES,
    built for weight streaming if STREAMING; a static one over a dynamic one, one without streaming when not asked
    for. Otherwise a ModelError saying why each was refused, offering the rebuild."""
    rebuild = f"run `sdrt build {model_dir}` to build engines for this GPU"
    mine = [c for c in candidates if c.model == model]
    if not mine:
        raise ModelError(f"no TensorRT engine for {model} in {model_dir}: {rebuild}")
    refused = []
    usable = []
    for c in mine:
        why = mismatch(c, compute_capability, trt_version)
        if why is None and c.source_hash != source_hash:
            why = "built from another export of the model (the ONNX file changed)"
        if why is None and shapes is not None and not profile_covers(c.profile, shapes):
            why = f"its profile does not cover input shapes {shapes}"
        if why is None and streaming and not c.options.get("weight_streaming"):
            why = "no weight streaming (sdrt build --weight-streaming)"
        (refused if why else usable).append((c, why))
    if not usable:
        detail = "; ".join(f"engine {c.key()} was built for {why}" for c, why in refused)
        raise ModelError(f"no usable TensorRT engine for {model}: {detail}. Not loading it: {rebuild}")
    usable.sort(key=lambda cw: (bool(cw[0].options.get("weight_streaming")) != streaming,
                                not static_profile(cw[0].profile), _profile_volume(cw[0].profile)))  # fmt: skip
    return usable[0][0]


def _profile_volume(profile: dict) -> int:
    return sum(math.prod(hi) for _, _, hi in profile.values())


# ----------------------------------------------------------------------------------------------- buffers


# ----------------------------------------------------------------------------------------------- refit (LoRA)


@dataclass(frozen=True)
class RefitPlan:
    """What one TensorRT refit sets: each weight as the engine wants it (its prototype's dtype, contiguous)."""

    arrays: dict  # ONNX initializer name -> np.ndarray
    restored: tuple[str, ...]  # names among them going back to the ONNX file's values


def refit_plan(prototypes: dict, weights: dict, previous, read_base) -> RefitPlan:
    """The refit that makes an engine run on WEIGHTS (ONNX initializer name -> array in the ONNX layout) in place of
    the ONNX file's values, the weights set before (PREVIOUS) and not in WEIGHTS going back to READ_BASE(names).

    PROTOTYPES: name -> (shape, numpy dtype) of every refittable weight (trt.Refitter.get_all_weights and
    get_weights_prototype): TensorRT refits only what the engine was built to refit (`sdrt build --refit`).
    """
    import numpy as np

    if weights and not prototypes:
        raise ModelError("this TensorRT engine cannot be refitted: build it with `sdrt build --refit` to use LoRAs")
    restored = tuple(sorted(set(previous) - set(weights)))
    arrays = dict(weights)
    arrays.update(read_base(list(restored)) if restored else {})
    out = {}
    for name, array in arrays.items():
        if name not in prototypes:
            raise ModelError(f"weight {name!r} is not refittable in this TensorRT engine (folded into another layer "
                             "at build time?): rebuild it with `sdrt build --refit`")  # fmt: skip
        shape, dtype = prototypes[name]
        array = np.asarray(array)
        if array.size != int(np.prod(shape)):
            raise ModelError(f"weight {name!r}: {array.shape} given, the engine holds {tuple(shape)}")
        out[name] = np.ascontiguousarray(array.reshape(shape), dtype=dtype)
    return RefitPlan(out, restored)
