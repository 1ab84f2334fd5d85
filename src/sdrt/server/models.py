"""The models a server offers: a registry of a folder's models under A1111's titles (`sdrt serve --models-dir DIR`)
and the LRU of loaded Pipelines the worker thread generates with.

A1111's CheckpointInfo (modules/sd_models.py) names a checkpoint by its path relative to the models folder
(`name`, files keep their suffix), `model_name` (that name without suffix, "/" -> "_"), the short hash (first 10
hex digits of the file's sha256) and the title "name [shorthash]" (just "name" while the hash is unknown). Here a
folder entry is an exported model (model.json: its sha256 is the source's, written by `sdrt export`), a diffusers
folder (model_index.json) or a single-file checkpoint (.safetensors/.ckpt); the last two are exported on first use
by the EXPORTER the CLI passes in (the server may not import sdrt.export). Anything else is listed as unusable,
with the reason, and refused when asked for.

Only the worker thread (jobs.py) calls LoadedModels.pipeline, so a switch waits for the running job and no two
models' weights ever meet in one run.
"""

import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sdrt.errors import InvalidOption, ModelError, SdrtError
from sdrt.runtime.manifest import MANIFEST_NAME, Manifest

log = logging.getLogger("sdrt.server")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
# Files A1111 keeps beside a checkpoint (its config, preview, notes): part of that model, not models themselves.
SIDECAR_SUFFIXES = (".yaml", ".yml", ".json", ".png", ".jpg", ".jpeg", ".webp", ".txt", ".md", ".info", ".vae.pt")
HASH_DIGITS = 10  # A1111's shorthash


@dataclass
class ModelEntry:
    """One model the server offers (A1111's CheckpointInfo)."""

    name: str  # A1111's name: the path relative to the models folder (files keep their suffix)
    path: Path
    kind: str  # "exported", "diffusers", "checkpoint" or "unusable"
    sha256: str | None = None  # the source checkpoint's, once known
    problem: str | None = None  # why it cannot be used (kind "unusable", or an export that failed)
    exported: Path | None = None  # the folder Pipeline.load reads: PATH itself, or the export cache's

    @property
    def model_name(self) -> str:
        stem = self.name[: -len(Path(self.name).suffix)] if self.kind == "checkpoint" else self.name
        return stem.replace("/", "_").replace("\\", "_")

    @property
    def shorthash(self) -> str | None:
        return self.sha256[:HASH_DIGITS] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]" if self.shorthash else self.name

    def aliases(self) -> set[str]:
        """The names a client may select it by (A1111's checkpoint_aliases: title, name, model_name, hashes)."""
        names = {self.title, self.name, self.model_name, str(self.path.name)}
        if self.sha256:
            names |= {self.shorthash, self.sha256, f"{self.model_name} [{self.shorthash}]"}
        return names

    def listing(self) -> dict:
        """A1111's SDModelItem; `filename` is the name, not the server's path; `unusable` says why it is refused."""
        item = {"title": self.title, "model_name": self.model_name, "hash": self.shorthash, "sha256": self.sha256,
                "filename": self.name, "config": None}  # fmt: skip
        if self.problem:
            item["unusable"] = self.problem
        return item

    @classmethod
    def of_manifest(cls, manifest: Manifest, name: str | None = None) -> "ModelEntry":
        sha = (getattr(manifest, "source", None) or {}).get("sha256") or None
        folder = getattr(manifest, "folder", None) or Path(manifest.model_name)
        return cls(name or manifest.model_name, folder, "exported", sha, exported=folder)


def scan_folder(folder: Path) -> list[ModelEntry]:
    """The models in FOLDER (checkpoints also in subfolders, as A1111 lists them), sorted by name; never raises
    for a bad entry."""
    entries, files = [], []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        name = path.relative_to(folder).as_posix()
        if path.is_dir():
            if (path / MANIFEST_NAME).is_file():
                entries.append(exported_entry(path, name))
            elif (path / "model_index.json").is_file():
                entries.append(ModelEntry(name, path, "diffusers"))
            continue
        if any(folder_part_is_model(folder, parent) for parent in path.relative_to(folder).parents if parent.parts):
            continue  # a file inside a model folder
        files.append((name, path))
    stems = {p.with_suffix("") for _, p in files if p.suffix.lower() in CHECKPOINT_SUFFIXES}
    for name, path in files:
        if path.suffix.lower() in CHECKPOINT_SUFFIXES:
            entries.append(ModelEntry(name, path, "checkpoint"))
        elif not is_sidecar(path, stems):
            entries.append(ModelEntry(name, path, "unusable", problem=f"not a model ({path.suffix or 'no suffix'})"))
    return sorted(entries, key=lambda e: e.name.lower())


def folder_part_is_model(root: Path, relative: Path) -> bool:
    folder = root / relative
    return (folder / MANIFEST_NAME).is_file() or (folder / "model_index.json").is_file()


def is_sidecar(path: Path, checkpoint_stems: set[Path]) -> bool:
    """A file A1111 keeps beside a checkpoint: same stem (model.yaml, model.preview.png, model.vae.pt)."""
    name = path.name.lower()
    return any(name.endswith(s) for s in SIDECAR_SUFFIXES) and any(
        str(path).startswith(str(stem) + ".") for stem in checkpoint_stems
    )


def exported_entry(path: Path, name: str) -> ModelEntry:
    try:
        return ModelEntry.of_manifest(Manifest.load(path), name)
    except SdrtError as e:
        return ModelEntry(name, path, "unusable", problem=str(e))
    except (OSError, ValueError) as e:  # an unreadable or malformed model.json
        return ModelEntry(name, path, "unusable", problem=f"{MANIFEST_NAME}: {e}")


class ModelRegistry:
    """The models on offer: a fixed list (one model: `sdrt serve -m`), or FOLDER's models, rescanned on refresh.
    EXPORTER(path) -> exported folder turns a checkpoint or diffusers folder into one (once: it caches)."""

    def __init__(self, entries=(), folder: Path | None = None, exporter: Callable | None = None):
        self.folder, self.exporter = (None if folder is None else Path(folder)), exporter
        self.lock = threading.Lock()  # guards entries and manifests
        self.export_locks: dict[Path, threading.Lock] = {}
        self.manifests: dict[Path, Manifest] = {}
        self.entries: list[ModelEntry] = list(entries)
        if self.folder is not None:
            self.refresh()

    @classmethod
    def single(cls, manifest: Manifest) -> "ModelRegistry":
        """The one model of `sdrt serve -m` (or of Ray's replicas), its manifest loaded already."""
        entry = ModelEntry.of_manifest(manifest)
        registry = cls([entry])
        registry.manifests[entry.path] = manifest
        return registry

    def refresh(self) -> None:
        """Rescan the folder (A1111's refresh-checkpoints); what was learned of a model still there is kept."""
        if self.folder is None:
            return
        if not self.folder.is_dir():
            raise ModelError(f"models folder {str(self.folder)!r} does not exist")
        found = scan_folder(self.folder)
        with self.lock:
            known = {(e.path, e.kind): e for e in self.entries}
            self.entries = [known.get((e.path, e.kind), e) for e in found]

    def listing(self) -> list[dict]:
        with self.lock:
            return [e.listing() for e in self.entries]

    def default(self) -> ModelEntry | None:
        """The model served when no client has chosen one: the first usable (exported ones first)."""
        with self.lock:
            usable = [e for e in self.entries if e.problem is None]
        return next((e for e in usable if e.kind == "exported"), usable[0] if usable else None)

    def find(self, title, field: str) -> ModelEntry:
        """The entry TITLE names (any A1111 alias); InvalidOption naming FIELD and listing the titles otherwise."""
        with self.lock:
            entries = list(self.entries)
        for entry in entries:
            if isinstance(title, str) and title in entry.aliases():
                if entry.problem is not None:
                    raise InvalidOption(field, title, f"a usable model; this one is not: {entry.problem}")
                return entry
        titles = [repr(e.title) for e in entries if e.problem is None]
        raise InvalidOption(field, title, "one of " + (", ".join(titles) or "(no usable model in the folder)"))

    def manifest(self, entry: ModelEntry) -> Manifest:
        """ENTRY's manifest, exporting it first if it is a checkpoint or diffusers folder (a second request for the
        same model waits for that export)."""
        with self.lock:
            if entry.path in self.manifests:
                return self.manifests[entry.path]
            export_lock = self.export_locks.setdefault(entry.path, threading.Lock())
        with export_lock:
            with self.lock:
                if entry.path in self.manifests:
                    return self.manifests[entry.path]
            manifest = self.export(entry)
            with self.lock:
                self.manifests[entry.path] = manifest
            return manifest

    def export(self, entry: ModelEntry) -> Manifest:
        if entry.exported is None:
            if self.exporter is None:
                raise ModelError(f"{entry.name}: exporting needs `sdrt serve` (the CLI), which passes an exporter")
            try:
                entry.exported = Path(self.exporter(str(entry.path)))
            except SdrtError as e:
                entry.problem = f"export failed: {e}"
                raise ModelError(f"{entry.name}: {entry.problem}") from None
            except Exception as e:  # a file that is not a checkpoint: whatever torch/safetensors raised
                log.exception("export of %s failed", entry.path)
                entry.problem = f"export failed: {type(e).__name__}: {e}"
                raise ModelError(f"{entry.name}: {entry.problem}") from None
        manifest = Manifest.load(entry.exported)
        entry.sha256 = entry.sha256 or manifest.source.get("sha256") or None  # the title gains the hash, as A1111
        return manifest


def weights_bytes(manifest: Manifest) -> int:
    """The bytes of a model's graphs and their external weights on disk: what loading it adds to memory, about."""
    total = 0
    for name in manifest.models:
        path = manifest.model_path(name)
        for file in (path, path.with_name(path.name + ".data")):
            total += file.stat().st_size if file.is_file() else 0
    return total


class LoadedModels:
    """Loaded Pipelines, least recently used first, at most MAX_LOADED (A1111's sd_checkpoints_limit) and, with a
    BUDGET in bytes, only as many as fit it by their weights (weights_bytes; the model asked for always loads);
    LOAD(folder) -> Pipeline. Called by the worker thread only (the lock also keeps any other caller safe)."""

    def __init__(self, registry: ModelRegistry, load: Callable, max_loaded: int = 1, budget: int | None = None):
        self.registry, self.load, self.max_loaded, self.budget = registry, load, max_loaded, budget
        self.sizes: dict[Path, int] = {}  # entry.path -> weights_bytes of each loaded model
        self.pipes: OrderedDict[Path, object] = OrderedDict()  # entry.path -> Pipeline
        self.unloaded: set[Path] = set()  # Pipelines whose engines unload-checkpoint freed
        self.lock = threading.RLock()

    def add(self, entry: ModelEntry, pipe) -> None:
        """A Pipeline loaded elsewhere (`sdrt serve -m`: loaded before serving)."""
        with self.lock:
            self.pipes[entry.path] = pipe

    def pipeline(self, entry: ModelEntry):
        """ENTRY's Pipeline: from the LRU, or loaded (the least recently used one unloaded first when full)."""
        with self.lock:
            if entry.path in self.pipes:
                self.pipes.move_to_end(entry.path)
                if entry.path in self.unloaded:
                    print(f"sdrt serve: loading {entry.title}", file=sys.stderr, flush=True)
                    load_engines(self.pipes[entry.path])
                    self.unloaded.discard(entry.path)
                    self.sizes[entry.path] = weights_bytes(self.registry.manifest(entry))
                return self.pipes[entry.path]
            manifest = self.registry.manifest(entry)
            size = weights_bytes(manifest)
            while self.pipes and (len(self.pipes) >= self.max_loaded or not self.fits(size)):
                path, pipe = self.pipes.popitem(last=False)
                self.sizes.pop(path, None)
                if path not in self.unloaded:
                    self.release(path, pipe)
                self.unloaded.discard(path)
            print(f"sdrt serve: loading {entry.title}", file=sys.stderr, flush=True)
            pipe = self.pipes[entry.path] = self.load(manifest.folder)
            self.sizes[entry.path] = size
            return pipe

    def fits(self, size: int) -> bool:
        """Whether a model of SIZE bytes fits the budget beside the loaded ones."""
        return self.budget is None or sum(self.sizes.values()) + size <= self.budget

    def latest(self):
        """The most recently used Pipeline, or None."""
        with self.lock:
            return next(reversed(self.pipes.values()), None)

    def unload_all(self) -> None:
        """A1111's unload-checkpoint: every loaded model's engines freed (loaded again when next used)."""
        with self.lock:
            for path, pipe in self.pipes.items():
                if path not in self.unloaded:
                    self.release(path, pipe)
                self.sizes[path] = 0  # nothing held until it is used again
            self.unloaded |= set(self.pipes)

    def loaded(self) -> list[Path]:
        with self.lock:
            return list(self.pipes)

    @staticmethod
    def release(path: Path, pipe) -> None:
        print(f"sdrt serve: unloading {path.name}", file=sys.stderr, flush=True)
        for engine in getattr(pipe, "engines", {}).values():
            engine.unload()
        if hasattr(pipe, "vae"):
            pipe.vae.swaps.unload()  # the swapped VAEs it ran (sd_vae)
        for refiner in getattr(pipe, "refiners", {}).values():
            for engine in refiner.engines.values():
                engine.unload()


def load_engines(pipe) -> None:
    """The engines Pipeline.load loads up front (text encoders, UNet, VAE decoder), unless they are staged."""
    if getattr(pipe.memory, "staged", False):
        return
    for name in ("text_encoder", "text_encoder_2", "unet", "vae_decoder"):
        if name in pipe.engines:
            pipe.engines[name].load()


@dataclass
class ModelsFolder:
    """`sdrt serve --models-dir FOLDER`: its models, at most MAX_LOADED loaded at once, DEFAULT (a title or name)
    served until a client switches; EXPORTER(path) -> exported folder (the CLI's export cache)."""

    folder: Path
    max_loaded: int = 1
    default: str | None = None
    exporter: Callable | None = None
    budget: int | None = None  # bytes of weights the loaded models may hold (--models-memory)

    @classmethod
    def from_args(cls, args, exporter: Callable) -> "ModelsFolder":
        """`sdrt serve --models-dir DIR [-m NAME] [--max-loaded-models N]`; bad values fail before serving."""
        if not Path(args.models_dir).is_dir():
            raise InvalidOption("--models-dir", args.models_dir, "an existing folder of models")
        if args.max_loaded_models <= 0:
            raise InvalidOption("--max-loaded-models", args.max_loaded_models, "a positive number")
        budget = None
        if args.models_memory is not None:
            from sdrt.engines.plan import parse_size

            budget = parse_size(args.models_memory, "--models-memory")
        return cls(Path(args.models_dir), args.max_loaded_models, args.model, exporter, budget)

    def loaded_models(self, engine_backend: str, loras, embeddings=None, upscalers=None,
                      controlnets=None) -> "LoadedModels":  # fmt: skip
        """The LRU over this folder's registry (Pipelines on ENGINE_BACKEND, LoRAs from LORAS, textual inversions
        from EMBEDDINGS, upscalers from UPSCALERS, ControlNets by name from CONTROLNETS), for
        generation.LocalBackend."""
        from sdrt.runtime.pipeline import Pipeline

        registry = ModelRegistry(folder=self.folder, exporter=self.exporter)
        if self.default is not None:
            registry.find(self.default, "--model")  # an unknown name fails before serving

        def load(path):
            pipe = Pipeline.load(path, backend=engine_backend, loras=loras, embeddings=embeddings, upscalers=upscalers)
            pipe.controlnets.directory = None if controlnets is None else Path(controlnets)  # units name them
            return pipe

        return LoadedModels(registry, load, self.max_loaded, self.budget)

    def start(self, server) -> None:
        """Select the default model and load it on the worker (requests queue behind it)."""
        from sdrt.server.jobs import Job

        entry = server.models.find(self.default, "--model") if self.default else server.models.default()
        if entry is None:
            log.warning("no usable model in %s", self.folder)
            return
        server.options["sd_model_checkpoint"] = entry.title
        server.options["sd_checkpoints_limit"] = self.max_loaded
        if entry.kind == "exported":  # a checkpoint is exported when first asked for, not at start
            server.backend.worker.submit(Job("load", lambda callback: server.backend.loaded.pipeline(entry), 1))
