"""A1111's model routes over models.py: sd-models, refresh-checkpoints, unload-checkpoint, reload-checkpoint, and
the switch POST /sdapi/v1/options {"sd_model_checkpoint": title} makes (the model is loaded before it answers)."""

from fastapi.concurrency import run_in_threadpool

from sdrt.errors import InvalidOption, check_int

# Declared in the OpenAPI schema of the routes that queue behind generations.
MAX_LOADED = 10  # A1111's sd_checkpoints_limit slider maximum
QUEUED_ERRORS = {429: {"description": "the queue is full; Retry-After says when to retry"}}


NO_REFINER = (None, "", "None", "none")  # A1111's values of refiner_checkpoint meaning none


def add_refiner(server, req, kwargs: dict) -> None:
    """A1111's refiner_checkpoint (a title of the same model list, exported on first use) and refiner_switch_at as
    Pipeline.generate's SDXL refiner options; the family validates the pair (an SDXL base, a compatible refiner)."""
    if req.refiner_checkpoint in NO_REFINER:
        return
    entry = server.models.find(req.refiner_checkpoint, "refiner_checkpoint")
    if req.refiner_switch_at is None:
        raise InvalidOption("refiner_switch_at", None, "a number between 0 and 1 with refiner_checkpoint (the "
                            "fraction of the steps after which the refiner takes over)")  # fmt: skip
    kwargs["refiner"] = str(server.models.manifest(entry).folder)
    kwargs["refiner_switch_at"] = req.refiner_switch_at


async def switch(server, title: str) -> str:
    """Make TITLE's model the loaded one (exported first if it is a checkpoint), after the running job: its title
    (which gains the hash once an export has computed it)."""
    entry = server.models.find(title, "sd_model_checkpoint")
    await run_in_threadpool(server.models.manifest, entry)
    if hasattr(server.backend, "in_worker"):  # over Ray each replica loads it when a request names it
        loaded = server.backend.loaded
        await server.backend.in_worker("load", lambda: loaded.pipeline(entry))
    return entry.title


async def apply(server, settings: dict) -> None:
    """The model settings of a POST /sdapi/v1/options: sd_model_checkpoint (loaded before the answer, as A1111
    does) and sd_checkpoints_limit (the LRU's size, from the next load)."""
    limit = settings.get("sd_checkpoints_limit")
    if limit is not None:
        settings["sd_checkpoints_limit"] = check_int("options.sd_checkpoints_limit", limit, 1, MAX_LOADED)
        if hasattr(server.backend, "loaded"):
            server.backend.loaded.max_loaded = settings["sd_checkpoints_limit"]
        elif settings["sd_checkpoints_limit"] != server.options["sd_checkpoints_limit"]:  # Ray: fixed at start
            raise InvalidOption("options.sd_checkpoints_limit", limit, f"{server.options['sd_checkpoints_limit']} "
                                "(each Ray replica's LRU size is set at start: --max-loaded-models)")  # fmt: skip
    if "sd_model_checkpoint" in settings:
        settings["sd_model_checkpoint"] = await switch(server, settings["sd_model_checkpoint"])


def add_routes(app, server) -> None:
    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        """A1111's SDModelItem list; `filename` is the name in the models folder (no server paths), and a file that
        cannot be used says why in `unusable`."""
        return server.models.listing()

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        """Rescan the models folder."""
        server.models.refresh()
        return None

    @app.post("/sdapi/v1/unload-checkpoint", responses=QUEUED_ERRORS)
    async def unload_checkpoint():
        """Free every loaded model (after the running job); the next request loads its model again."""
        if hasattr(server.backend, "in_worker"):
            await server.backend.in_worker("unload", server.backend.loaded.unload_all)
        return None

    @app.post("/sdapi/v1/reload-checkpoint", responses=QUEUED_ERRORS)
    async def reload_checkpoint():
        """Load the current model (sd_model_checkpoint) if it is not loaded."""
        server.options["sd_model_checkpoint"] = await switch(server, server.options["sd_model_checkpoint"])
        return None
