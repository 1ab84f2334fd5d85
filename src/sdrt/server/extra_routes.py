"""The A1111 routes clients call besides generation (modules/api/api.py): embeddings, refresh-embeddings,
refresh-loras, skip, memory, prompt-styles, scripts, script-info, extensions, face-restorers, cmd-flags, sd-vae,
refresh-vae, hypernetworks. Each answers truthfully for sdrt: what exists, an empty list where nothing
does (sdrt has no face restorers, hypernetworks, extensions or selectable scripts)."""

import os
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.server.model_routes import QUEUED_ERRORS
from sdrt.server.styles import StyleDatabase
from sdrt.server.vaes import VaeFolder


@dataclass
class Extras:
    """What `sdrt serve` was started with beyond the model: --embeddings-dir, --styles-file, and the flags
    /sdapi/v1/cmd-flags reports (A1111's names; folders by name only, never server paths)."""

    embeddings_dir: Path | None = None
    styles: StyleDatabase = field(default_factory=StyleDatabase)
    flags: dict = field(default_factory=dict)
    vaes: VaeFolder = field(default_factory=VaeFolder)  # --vae-dir (vaes.py)

    @classmethod
    def from_args(cls, args, vae_exporter=None) -> "Extras":
        """From `sdrt serve`'s arguments: a bad --embeddings-dir, --styles-file or --vae-dir fails here, before
        serving; VAE_EXPORTER(source, model_dir, field) -> an exported VAE folder (the CLI's)."""
        from sdrt.errors import InvalidOption

        embeddings = None if args.embeddings_dir is None else Path(args.embeddings_dir)
        if embeddings is not None and not embeddings.is_dir():
            raise InvalidOption("--embeddings-dir", args.embeddings_dir, "a folder of textual inversions")
        if args.vae_dir is not None and not Path(args.vae_dir).is_dir():
            raise InvalidOption("--vae-dir", args.vae_dir, "a folder of VAE files or diffusers VAE folders")
        styles = StyleDatabase(args.styles_file)
        vaes = VaeFolder(None if args.vae_dir is None else Path(args.vae_dir), vae_exporter)
        return cls(embeddings, styles, cmd_flags(args), vaes)


def cmd_flags(args) -> dict:
    """A1111's cmd_opts names for what `sdrt serve` was started with; folders by name, credentials hidden."""

    def name(path):
        return None if path is None else Path(path).name

    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    return {"api": True, "nowebui": False, "listen": not loopback, "port": args.port,
            "api_auth": None if args.api_auth is None else "(hidden)", "ckpt": name(args.model),
            "ckpt_dir": name(args.models_dir), "lora_dir": name(args.lora_dir),
            "embeddings_dir": name(args.embeddings_dir), "vae_dir": name(args.vae_dir),
            "styles_file": [name(args.styles_file)] if args.styles_file
            else [], "controlnet_dir": name(args.controlnet_dir), "lowvram": False, "medvram": False,
            "use_cpu": ["all"] if (args.backend or "cpu") == "cpu" else [], "sdrt_backend": args.backend or "cpu",
            "sdrt_max_loaded_models": args.max_loaded_models, "sdrt_ray": bool(args.ray)}  # fmt: skip


def encoder_widths(manifest) -> set[int]:
    """The widths of the text encoders an embedding must have vectors for: each text model's token embeddings
    (SDXL: CLIP-L's 768 and OpenCLIP-G's 1280; its refiner: 1280 only)."""
    from sdrt.runtime.families import family_of

    widths = set()
    for name in family_of(manifest).text_models(manifest):
        widths |= {int(t["shape"][-1]) for t in manifest.models[name]["inputs"] if t["name"] == "inputs_embeds"}
    return widths or {manifest.text_hidden_size}


def embeddings_listing(folder: Path | None, manifest) -> dict:
    """A1111's EmbeddingsResponse: the folder's embeddings, `loaded` if they fit the current model's text encoders,
    else `skipped`. step and sd_checkpoint are training records sdrt does not read: null."""
    from sdrt.runtime.embeddings import EmbeddingDB

    out = {"loaded": {}, "skipped": {}}
    if folder is None:
        return out
    widths = encoder_widths(manifest)
    for name, embedding in EmbeddingDB().load_dir(folder).by_name.items():
        fits = widths <= set(embedding.vectors)
        shape = max(widths) if fits else max(embedding.vectors)
        item = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": shape,
                "vectors": embedding.length}  # fmt: skip
        out["loaded" if fits else "skipped"][name] = item
    return out


def reload_embeddings(pipes, folder: Path) -> None:
    """Every loaded Pipeline's embeddings read again from FOLDER (run on the worker, between jobs)."""
    for pipe in pipes:
        pipe.embeddings.by_name.clear()
        pipe.embeddings.load_dir(folder)


def reload_loras(pipes) -> None:
    """Every loaded Pipeline's LoRA folder listed again (new files usable, removed ones gone)."""
    for pipe in pipes:
        folder = getattr(pipe.loras, "folder", None)
        if folder is not None:
            pipe.loras.available.clear()
            pipe.loras.load_dir(folder)


def memory() -> dict:
    """A1111's MemoryResponse: this process's RAM (free = total - used, as A1111 computes it) and, with an NVIDIA
    GPU and nvidia-ml-py, the device's memory; else cuda {"error": ...}."""
    try:
        import psutil

        process = psutil.Process(os.getpid())
        used, total = process.memory_info().rss, psutil.virtual_memory().total
    except ImportError:
        used = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    ram = {"free": total - used, "used": used, "total": total}
    try:
        import pynvml

        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
        cuda = {"system": {"free": info.free, "used": info.used, "total": info.total}}
    except Exception:  # no nvidia-ml-py, no driver, no GPU: what A1111 says without CUDA
        cuda = {"error": "unavailable"}
    return {"ram": ram, "cuda": cuda}


def scripts(server) -> dict:
    """A1111's ScriptsList: the ControlNet extension's alwayson script where units are served (sdrt serve -m)."""
    names = ["controlnet"] if server.pipe is not None else []
    return {"txt2img": names, "img2img": names}


def script_info(server) -> list[dict]:
    return [{"name": name, "is_alwayson": True, "is_img2img": img2img, "args": []}
            for img2img in (False, True) for name in scripts(server)["txt2img"]]  # fmt: skip


def add_routes(app, server, extras: Extras) -> None:
    @app.get("/sdapi/v1/embeddings")
    def embeddings():
        return embeddings_listing(extras.embeddings_dir, server.manifest)

    @app.post("/sdapi/v1/refresh-embeddings", responses=QUEUED_ERRORS)
    async def refresh_embeddings():
        if extras.embeddings_dir is not None and hasattr(server.backend, "in_worker"):
            pipes = server.backend.loaded.pipes.values
            await server.backend.in_worker("refresh", lambda: reload_embeddings(list(pipes()), extras.embeddings_dir))
        return None

    @app.post("/sdapi/v1/refresh-loras", responses=QUEUED_ERRORS)
    async def refresh_loras():
        if hasattr(server.backend, "in_worker"):
            pipes = server.backend.loaded.pipes.values
            await server.backend.in_worker("refresh", lambda: reload_loras(list(pipes())))
        return None

    @app.post("/sdapi/v1/skip")
    async def skip():
        """End the running job's current image (batch) now, with what it has; the job goes on with the next."""
        if hasattr(server.backend, "skip"):
            await server.backend.skip()
        return None

    @app.get("/sdapi/v1/memory")
    def get_memory():
        return memory()

    @app.get("/sdapi/v1/prompt-styles")
    def prompt_styles():
        return extras.styles.listing()

    @app.get("/sdapi/v1/scripts")
    def get_scripts():
        return scripts(server)

    @app.get("/sdapi/v1/script-info")
    def get_script_info():
        return script_info(server)

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags():
        return extras.flags

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae():
        """A1111's SDVaeItem list: the VAEs of --vae-dir by their name there (sd_vae selects one; "Automatic" or
        "None": each model's own)."""
        return extras.vaes.listing()

    @app.post("/sdapi/v1/refresh-vae")
    def refresh_vae():
        """Rescan --vae-dir."""
        extras.vaes.refresh()
        return None

    # upscalers, latent-upscale-modes, realesrgan-models: extras_api.py (hires fix and the extras routes)
    empty = {"extensions": "extensions", "face-restorers": "face restorers", "hypernetworks": "hypernetworks"}
    for path, what in empty.items():
        app.add_api_route(f"/sdapi/v1/{path}", empty_list, methods=["GET"], summary=f"sdrt has no {what}: []")


def empty_list() -> list:
    return []
