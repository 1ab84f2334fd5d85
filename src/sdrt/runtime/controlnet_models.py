"""Exported ControlNets (`sdrt export-controlnet`): their manifest (ControlNetInfo), and a pipeline's cache of the
ones it loaded (ControlNetCache), found by folder or by name in a directory (the server's --controlnet-dir)."""

import json
from dataclasses import dataclass
from pathlib import Path

from sdrt.errors import InvalidOption, ModelError

CONTROLNET_MANIFEST = "controlnet.json"
CONTROLNET_FORMAT = "sdrt-controlnet"
CONTROLNET_VERSION = 1


def controlnet_family(config: dict) -> str:
    """sdxl (added text/time conditioning), sd2 (1024-wide cross-attention or linear projections) or sd1."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if config.get("cross_attention_dim") == 1024 or config.get("use_linear_projection") else "sd1"


def short_hash(sha256: str) -> str:
    """The extension's model hash in names: the first 8 hex digits of the file's sha256."""
    return sha256[:8]


@dataclass(frozen=True)
class ControlNetInfo:
    """An exported ControlNet folder's controlnet.json, validated."""

    folder: Path
    family: str
    name: str
    sha256: str
    precision: str
    global_pool_conditions: bool
    inputs: tuple[str, ...]
    residuals: tuple[tuple[str, int], ...]  # (output name, channels) in order: down residuals, then mid

    @property
    def title(self) -> str:
        """The extension's model_list entry: "name [hash]"."""
        return f"{self.name} [{short_hash(self.sha256)}]" if self.sha256 else self.name

    @property
    def model_file(self) -> Path:
        return self.folder / self.file

    file: str = "controlnet/model.onnx"

    @classmethod
    def load(cls, folder) -> "ControlNetInfo":
        folder = Path(folder)
        path = folder / CONTROLNET_MANIFEST
        if not path.is_file():
            raise ModelError(
                f"{str(folder)!r} is not a ControlNet exported by `sdrt export-controlnet` (no {CONTROLNET_MANIFEST})"
            )
        try:
            data = json.loads(path.read_text())
            if data.get("format") != CONTROLNET_FORMAT or data.get("version") != CONTROLNET_VERSION:
                raise ModelError(
                    f"{str(path)!r} is not an sdrt ControlNet manifest of version {CONTROLNET_VERSION}: "
                    "re-export it with this sdrt"
                )
            model = data["model"]
            info = cls(
                folder=folder,
                family=data["family"],
                name=data["name"],
                sha256=data["source"].get("sha256", ""),
                precision=data["precision"],
                global_pool_conditions=bool(data.get("global_pool_conditions", False)),
                inputs=tuple(t["name"] for t in model["inputs"]),
                residuals=tuple((t["name"], int(t["shape"][1])) for t in model["outputs"]),
                file=model["file"],
            )
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{str(path)!r} is incomplete or malformed ({e})") from None
        if not info.model_file.is_file():
            raise ModelError(f"model file {str(info.model_file)!r} is missing")
        return info


class ControlNetCache:
    """A pipeline's ControlNets by folder: their manifests and engines, loaded once; `directory` (optional) is
    where names are looked up (the server's --controlnet-dir)."""

    def __init__(self, backend: str, directory=None):
        self.backend = backend
        self.directory = None if directory is None else Path(directory)
        self.loaded: dict[str, tuple[ControlNetInfo, object]] = {}

    def available(self) -> list[ControlNetInfo]:
        """The exported ControlNets in `directory`, sorted by name."""
        if self.directory is None or not self.directory.is_dir():
            return []
        found = []
        for folder in sorted(p for p in self.directory.iterdir() if (p / CONTROLNET_MANIFEST).is_file()):
            try:
                found.append(ControlNetInfo.load(folder))
            except ModelError:
                continue
        return found

    def resolve(self, model, field: str) -> Path:
        """MODEL (a folder, or a name/title in `directory`) -> the ControlNet folder; InvalidOption if none."""
        if isinstance(model, (str, Path)) and str(model).strip():
            path = Path(model)
            if (path / CONTROLNET_MANIFEST).is_file():
                return path
            for info in self.available():
                if str(model) in (info.name, info.title, info.folder.name):
                    return info.folder
        names = [info.title for info in self.available()]
        allowed = "an exported ControlNet folder" + (f" or one of: {', '.join(names)}" if names else "")
        raise InvalidOption(f"{field}.model", model, allowed)

    def get(self, model, field: str) -> tuple[ControlNetInfo, object]:
        from sdrt.engines import create_engine

        folder = self.resolve(model, field)
        key = str(folder.resolve())
        if key not in self.loaded:
            info = ControlNetInfo.load(folder)
            self.loaded[key] = (info, create_engine(info.model_file, self.backend))
        return self.loaded[key]
