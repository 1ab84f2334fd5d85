"""Checkpoint sources -> a diffusers pipeline in float32: diffusers folder, single file (+ YAML), hub id."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.errors import InvalidOption, ModelError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
HASHED_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json", ".txt")


@dataclass
class Source:
    pipe: object  # a diffusers StableDiffusionPipeline, float32, on the CPU
    kind: str  # "diffusers" | "single_file" | "hub"
    name: str  # what A1111 shows as "Model"
    sha256: str  # of the checkpoint file, or of a folder's files (sorted by path)


def file_sha256(path: Path, digest=None):
    """sha256 of a file, read in 16 MB blocks (A1111's model hash is its first 10 hex digits)."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    return digest


def folder_sha256(folder: Path) -> str:
    """sha256 over every weight/config file of a folder: relative path, then contents, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in HASHED_SUFFIXES):
        digest.update(str(path.relative_to(folder)).encode())
        file_sha256(path, digest)
    return digest.hexdigest()


def check_ckpt_is_tensors_only(path: Path) -> None:
    """Open a pickled checkpoint with torch's restricted unpickler; refuse one that holds code or objects."""
    import pickle

    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"refusing {str(path)!r}: it is not a plain tensor checkpoint, and loading it could run code "
            f"({first_line[:200]}). Convert it to .safetensors with a tool you trust."
        ) from None


def load_source(source: str, original_config: str | None = None, config: str | None = None) -> Source:
    """Load SOURCE (folder with model_index.json, single file, or hub id) as a float32 pipeline.

    For a single file, CONFIG (a diffusers folder or hub id holding the component configs) makes loading
    work offline; without it diffusers infers the model and fetches its configs from the hub.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    path = Path(source)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{source!r} is a folder without model_index.json: not a diffusers model folder")
        try:
            pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, safety_checker=None)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"could not load the diffusers folder {source!r}: {e}") from None
        return Source(pipe, "diffusers", path.resolve().name, folder_sha256(path))
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise InvalidOption(
                "SOURCE",
                source,
                "a diffusers folder, a " + "/".join(SINGLE_FILE_SUFFIXES) + " file or a hub id",
            )
        if path.suffix.lower() != ".safetensors":
            check_ckpt_is_tensors_only(path)
        kwargs = {"original_config": str(original_config)} if original_config else {}
        if config:
            kwargs |= {"config": str(config), "local_files_only": Path(config).is_dir()}
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), torch_dtype=torch.float32, safety_checker=None, **kwargs
            )
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            hint = "" if config else " (offline, pass --config with a diffusers folder of the same architecture)"
            raise ModelError(f"could not load the checkpoint {source!r}: {str(e)[:500]}{hint}") from None
        return Source(pipe, "single_file", path.stem, file_sha256(path).hexdigest())
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES or source.startswith((".", "/")) or source.count("/") != 1:
        raise ModelError(f"{source!r} does not exist (expected a diffusers folder, a checkpoint file or a hub id)")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(source, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as e:  # network and hub errors come in many types
        raise ModelError(f"could not download {source!r} from the hub: {e}") from None
    loaded = load_source(str(folder))
    return Source(loaded.pipe, "hub", source, loaded.sha256)
