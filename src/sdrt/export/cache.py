"""The model cache (`$SDRT_CACHE/models`, else ~/.cache/sdrt/models): a checkpoint file, diffusers folder or hub id
given where an exported model is expected is exported there once and reused; with no model given, the default one
(DEFAULT_MODEL, A1111's first-start download) is.

Several processes may ask for the same source at once (workers, Ray replicas, two commands): one exports under the
entry's lock, the others wait and use its result; a process killed mid-export leaves nothing that a later one takes
for a model (sdrt/cache_files.py: a private temporary, a marker written last, one rename).
"""

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

from sdrt import cache_files
from sdrt.errors import SdrtError
from sdrt.export import faults
from sdrt.runtime.manifest import MANIFEST_NAME, MANIFEST_VERSION

# What `sdrt generate "a cat"` runs when no -m is given: SD 1.5 from the hub, exported into the cache on first use
# (as A1111 downloads it on its first start). Offline, one error says how to pass a local model instead.
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Files of an entry that may be rewritten in place after it was published (`sdrt optimize` adds to the manifest).
MUTABLE_FILES = (MANIFEST_NAME,)


def cache_dir() -> Path:
    return Path(os.environ.get("SDRT_CACHE", Path.home() / ".cache" / "sdrt")) / "models"


def is_source(model: str) -> bool:
    """MODEL names something to export (a checkpoint file, a diffusers folder, a hub id), not an exported folder."""
    path = Path(model)
    is_checkpoint = path.is_file() or (path / "model_index.json").is_file()
    looks_like_hub_id = not path.exists() and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) is not None
    return is_checkpoint or looks_like_hub_id


def entry_for(model: str) -> Path:
    """The cache folder of source MODEL: its name, and a hash of its path and its files' sizes and times (an edited
    checkpoint is a new entry)."""
    path = Path(model)
    identity = str(path.resolve()) if path.exists() else model
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    identity += "".join(f":{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.name or model)[:60]
    return cache_dir() / f"{name}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def is_current(entry: Path) -> bool:
    """ENTRY is complete (marker, every file at its size) and its manifest is one this sdrt reads."""
    if not cache_files.is_complete(entry, MUTABLE_FILES):
        return False
    try:
        return json.loads((entry / MANIFEST_NAME).read_text()).get("version") == MANIFEST_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def resolve_model(model: str | None) -> Path:
    """A model folder as is; a checkpoint file, diffusers folder or hub id exported once into the cache; None: the
    DEFAULT_MODEL."""
    if model is None:
        return default_model()
    if not is_source(model):
        return Path(model)  # an exported folder (or a bad path: Manifest.load says what is wrong)
    entry = entry_for(model)
    if is_current(entry):
        cache_files.tidy(entry)
        return entry
    with faults.machine_faults(entry, None, "the export into the model cache"), \
            cache_files.entry_lock(entry, f"exporting {model}"):  # fmt: skip
        if is_current(entry):  # exported by another process while this one waited
            return entry
        cache_files.remove_leftovers(entry)
        for stale in entry.parent.glob(f".{entry.name}.partial-*"):  # what an sdrt before the lock left when killed
            shutil.rmtree(stale, ignore_errors=True)
        cache_files.discard(entry)  # incomplete, damaged or from an older sdrt
        try:
            from sdrt.export import export
        except ImportError as e:
            raise SdrtError(f"{model!r} needs exporting first, which needs `pip install sdrt[export]` ({e})") from None
        print(f"exporting {model} once into {entry}", file=sys.stderr)
        with cache_files.staging_for(entry) as staging:
            export(model, staging / "model", overwrite=False)
            cache_files.publish(staging / "model", entry)
            staging.rmdir()
    return entry


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
