"""`sdrt serve --ray --models-dir DIR`: the models a Generator replica holds, and the ingress's registry of the folder.

The ingress (app.Server over a models.ModelRegistry of the folder) lists the models (sd-models, refresh-checkpoints),
resolves each request's model (sd_model_checkpoint from the options or the request's override_settings), exports a
checkpoint or diffusers folder on first use (the CLI's exporter, in the ingress's process) and sends the ModelEntry,
its exported folder named, with the request. A replica loads that folder into its own LRU (models.LoadedModels,
--max-loaded-models and --models-memory each), between its jobs (the Generator's lock), so no run mixes weights.
On a cluster of several machines the models folder and the export cache must be the same path on every node.

With `-m MODEL` (no folder) a replica holds that one Pipeline, loaded at start, whatever the entry says.
"""

from pathlib import Path
from types import SimpleNamespace

from sdrt.server.models import LoadedModels, ModelRegistry


class ReplicaModels:
    """A replica's Pipelines: MODEL's (loaded now) or, with MODEL None, an LRU of up to MAX_LOADED of the entries
    requests name (BUDGET: bytes of weights, as --models-memory). LOAD(folder) -> Pipeline."""

    def __init__(self, model: str | None, load, max_loaded: int = 1, budget: int | None = None):
        self.fixed = None if model is None else load(model)
        self.loaded = LoadedModels(ModelRegistry(), load, max_loaded, budget)

    def manifest(self, entry):
        """ENTRY's Manifest (no engines loaded): what batching validates a request against."""
        if self.fixed is not None:
            return self.fixed.manifest
        return self.loaded.registry.manifest(entry)  # the ingress exported it: its folder is named

    def options_holder(self, entry):
        """What batching.options_of reads (a `.manifest`), without loading ENTRY's engines."""
        return SimpleNamespace(manifest=self.manifest(entry))

    def pipeline(self, entry):
        """ENTRY's Pipeline, loaded into the LRU if it is not there (the caller holds the Generator's lock)."""
        if self.fixed is not None:
            return self.fixed
        return self.loaded.pipeline(entry)

    def key(self, entry) -> Path | None:
        """What tells ENTRY's weights apart in a batch key (None: the one model)."""
        return None if self.fixed is not None or entry is None else entry.path


def ingress_registry(models_dir: str | None, exporter) -> ModelRegistry | None:
    """The ingress's registry of MODELS_DIR (checkpoints exported by EXPORTER), or None for `-m MODEL`."""
    if models_dir is None:
        return None
    return ModelRegistry(folder=Path(models_dir), exporter=exporter)


def ray_extras(options, vae_exporter):
    """The ingress's extra_routes.Extras: the VAE folder (options.vae_dir, exported by VAE_EXPORTER), or none."""
    from sdrt.server.extra_routes import Extras
    from sdrt.server.vaes import VaeFolder

    if options.vae_dir is None:
        return Extras()
    return Extras(vaes=VaeFolder(Path(options.vae_dir), vae_exporter))


def start_options(server, default: str | None, max_loaded: int) -> None:
    """The ingress's sd_model_checkpoint (DEFAULT, or the folder's first usable model) and sd_checkpoints_limit."""
    entry = server.models.find(default, "--model") if default else server.models.default()
    if entry is not None:
        server.options["sd_model_checkpoint"] = entry.title
    server.options["sd_checkpoints_limit"] = max_loaded
