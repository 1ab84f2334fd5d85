"""The model cache: a checkpoint file, diffusers folder or hub id given where an exported folder is expected is
exported once into ~/.cache/sdrt/models (or $SDRT_CACHE/models) and reused; with no model given, the default one
(DEFAULT_MODEL, A1111's first-start download) is."""

import hashlib
import json
import os
import re
import sys
from pathlib import Path

from sdrt.errors import SdrtError

# What `sdrt generate "a cat"` runs when no -m is given: SD 1.5 from the hub, exported into the cache on first use
# (as A1111 downloads it on its first start). Offline, one error says how to pass a local model instead.
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def cache_dir() -> Path:
    return Path(os.environ.get("SDRT_CACHE", Path.home() / ".cache" / "sdrt")) / "models"


def resolve_model(model: str | None) -> Path:
    """A model folder as is; a checkpoint file, diffusers folder or hub id exported once into the cache; None: the
    DEFAULT_MODEL."""
    if model is None:
        return default_model()
    path = Path(model)
    is_checkpoint = path.is_file() or (path / "model_index.json").is_file()
    looks_like_hub_id = not path.exists() and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) is not None
    if not (is_checkpoint or looks_like_hub_id):
        return path  # an exported folder (or a bad path: Manifest.load says what is wrong)
    identity = str(path.resolve()) if path.exists() else model
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    identity += "".join(f":{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    target = cache_dir() / (
        re.sub(r"[^A-Za-z0-9._-]", "_", path.name or model)[:60]
        + "-"
        + hashlib.sha256(identity.encode()).hexdigest()[:12]
    )
    if not _current_export(target):
        try:
            from sdrt.export import export
        except ImportError as e:
            raise SdrtError(f"{model!r} needs exporting first, which needs `pip install sdrt[export]` ({e})") from None
        print(f"exporting {model} once into {target}", file=sys.stderr)
        export(model, target, overwrite=True)
    return target


def _current_export(folder: Path) -> bool:
    """FOLDER holds a manifest this sdrt reads (a cached export from an older sdrt is made again)."""
    from sdrt.runtime.manifest import MANIFEST_NAME, MANIFEST_VERSION

    try:
        return json.loads((folder / MANIFEST_NAME).read_text()).get("version") == MANIFEST_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def default_model() -> Path:
    """DEFAULT_MODEL's export in the cache, made on first use (with progress); offline and not cached yet: one
    SdrtError saying how to pass a local checkpoint or exported folder."""
    try:
        return resolve_model(DEFAULT_MODEL)
    except Exception as e:  # no network, the hub's refusal, ...: the user needs another way in, not a traceback
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SdrtError(
            f"no model given (-m), and the default model {DEFAULT_MODEL} could not be exported ({why}): pass a "
            "local one with -m: a checkpoint file (.safetensors, .ckpt), a diffusers folder, or a folder made by "
            "`sdrt export`"
        ) from None
