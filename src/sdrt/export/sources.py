"""Checkpoint sources -> a diffusers pipeline in float32: diffusers folder, single file (+ YAML), hub id."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from sdrt.errors import InvalidOption, ModelError
from sdrt.export.detect import CheckpointInfo

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
HASHED_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json", ".txt")


@dataclass
class Source:
    pipe: object  # a diffusers StableDiffusionPipeline, float32, on the CPU
    kind: str  # "diffusers" | "single_file" | "hub"
    name: str  # what A1111 shows as "Model"
    sha256: str  # of the checkpoint file, or of a folder's files (sorted by path)
    checkpoint: CheckpointInfo | None = None  # a single file's tensor shapes; None for diffusers folders
    user_config: str | None = None  # the diffusers config the user gave (the folder, or --config), in words


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


def read_checkpoint_info(path: Path) -> CheckpointInfo:
    """Tensor names and shapes of a single file, without loading its data.

    A pickled checkpoint is opened with torch's restricted unpickler: one that holds code or objects is refused.
    """
    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return CheckpointInfo({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{str(path)!r} is not a valid .safetensors file ({e})") from None
    checkpoint, global_step = _load_pickled(path)
    shapes = {k: tuple(v.shape) for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    return CheckpointInfo(shapes, global_step if isinstance(global_step, int) else None)


def _load_pickled(path: Path) -> tuple[dict, int | None]:
    """(state dict, Lightning's global_step or None) of a pickled checkpoint, through torch's weights-only
    unpickler: a file holding code or objects is refused and none of it runs."""
    import pickle

    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"refusing {str(path)!r}: it is not a plain tensor checkpoint, and loading it could run code "
            f"({first_line[:200]}). Convert it to .safetensors with a tool you trust."
        ) from None
    global_step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]  # Lightning checkpoints nest the weights
    if not isinstance(checkpoint, dict):
        raise ModelError(f"{str(path)!r} holds a {type(checkpoint).__name__}, not a dict of tensors")
    return checkpoint, global_step


load_pickled = _load_pickled  # for other exports' single files (upscalers)


def checkpoint_info(source: str) -> CheckpointInfo | None:
    """A single file's tensor shapes (the export registry tells families apart by them); None for folders and hub
    ids."""
    path = Path(source)
    return read_checkpoint_info(path) if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES else None


def load_weights(path: Path) -> dict:
    """A single file's tensors by name: .safetensors directly, anything else through _load_pickled."""
    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{str(path)!r} is not a valid .safetensors file ({e})") from None
    checkpoint, _ = _load_pickled(path)
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def load_source(source: str, original_config: str | None = None, config: str | None = None) -> Source:
    """Load SOURCE (folder with model_index.json, single file, or hub id) as a float32 pipeline.

    For a single file, CONFIG (a diffusers folder or hub id holding the component configs) makes loading
    work offline and defines the architecture; ORIGINAL_CONFIG (the LDM YAML) then only informs detection.
    Without CONFIG, diffusers builds the UNet and VAE from ORIGINAL_CONFIG if given, and fetches the other
    configs from the hub.
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
        return Source(pipe, "diffusers", path.resolve().name, folder_sha256(path), user_config="diffusers folder")
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise InvalidOption(
                "SOURCE",
                source,
                "a diffusers folder, a " + "/".join(SINGLE_FILE_SUFFIXES) + " file or a hub id",
            )
        checkpoint = read_checkpoint_info(path)
        if config:
            # diffusers would build the UNet and VAE from the YAML and ignore CONFIG for them; the diffusers
            # config is exact (group norms, attention upcasting) where the YAML conversion guesses.
            kwargs = {"config": str(config), "local_files_only": Path(config).is_dir()}
        else:
            kwargs = {"original_config": str(original_config)} if original_config else {}
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), torch_dtype=torch.float32, safety_checker=None, **kwargs
            )
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            hint = "" if config else " (offline, pass --config with a diffusers folder of the same architecture)"
            raise ModelError(f"could not load the checkpoint {source!r}: {str(e)[:500]}{hint}") from None
        user_config = f"--config {config}" if config else None
        return Source(pipe, "single_file", path.stem, file_sha256(path).hexdigest(), checkpoint, user_config)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES or source.startswith((".", "/")) or source.count("/") != 1:
        raise ModelError(f"{source!r} does not exist (expected a diffusers folder, a checkpoint file or a hub id)")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(source, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as e:  # network and hub errors come in many types
        raise ModelError(f"could not download {source!r} from the hub: {e}") from None
    loaded = load_source(str(folder))
    return Source(loaded.pipe, "hub", source, loaded.sha256, user_config=f"hub {source}")


def is_hub_id(source: str) -> bool:
    """SOURCE names a model on the hub ("owner/name"), not a local path."""
    return not Path(source).exists() and source.count("/") == 1 and not source.startswith((".", "/"))
