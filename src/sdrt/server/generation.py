"""What the routes ask of a Pipeline, and the backends that run it: in this process (LocalBackend, `sdrt serve`)
or on Ray Serve replicas (ray_app.RayBackend). The routes (app.py) see only this seam:

    backend.manifest                          the model's Manifest (the ingress needs no engines), or
    backend.models                            a models.ModelRegistry (several models; generation.model picks one)
    backend.in_worker(kind, fn) -> Future     (optional) FN run between jobs: model switches
    backend.submit(generation) -> Future      an asyncio future of the images; cancel() frees its place
    await backend.progress(skip_image, id)    A1111's ProgressResponse
    await backend.interrupt(id)               A1111's Interrupt
    backend.stop()
"""

import asyncio
import uuid
from dataclasses import dataclass, field

from sdrt.server.codec import encode_png
from sdrt.server.jobs import Job, State, Worker
from sdrt.server.models import LoadedModels, ModelRegistry


@dataclass
class Generation:
    """One request's Pipeline call, picklable (a Ray replica runs it): generate(**kwargs), or
    outpaint(image, **amounts, **kwargs). kwargs (prompt included) have been validated and their seeds pinned
    (a1111.resolve_request)."""

    kind: str  # A1111's job name: "txt2img", "img2img", "outpaint"
    kwargs: dict
    batches: int  # n_iter: A1111's job_count
    preview_every: int = 0  # steps between live previews; 0: none
    preview_method: str = "Full"  # A1111's show_progress_type (runtime/previews.py)
    image: object = None  # outpaint: the PIL image to extend
    amounts: dict = field(default_factory=dict)  # outpaint: left/right/up/down pixels
    task_id: str = field(default_factory=lambda: f"task({uuid.uuid4().hex[:15]})")  # A1111's id_task
    model: object = None  # the models.ModelEntry to run on (None: the backend's only model)

    def run(self, pipe, callback) -> list:
        """The PIL images (each with its infotext)."""
        options = {"callback": callback, "progress": False, **self.kwargs}
        if self.kind == "outpaint":
            return pipe.outpaint(self.image, **self.amounts, **options)
        return pipe.generate(**options)

    def batch_request(self) -> dict | None:
        """Pipeline.generate keyword arguments (prompt included) for runtime.batching, or None: runs alone."""
        if self.kind != "txt2img" or self.batches != 1:
            return None
        return dict(self.kwargs)


def preview_png(pipe, denoised, method: str = "Full") -> str:
    """The first image's current x0 estimate as base64 PNG, by A1111's live preview METHOD (Full: the VAE)."""
    return encode_png(pipe.preview(denoised[:1], method)[0])


class LocalBackend:
    """`sdrt serve`: Pipelines in this process (one, or an LRU of a models folder's: models.py), behind the one
    Worker thread and its bounded queue."""

    def __init__(self, pipe=None, max_queue: int = 8, loaded: LoadedModels | None = None):
        if loaded is None:  # one model, loaded already
            loaded = LoadedModels(ModelRegistry.single(pipe.manifest), load=None)
            loaded.add(loaded.registry.entries[0], pipe)
        self.loaded, self.models, self.single = loaded, loaded.registry, pipe
        self.worker = Worker(max_queue)

    @property
    def pipe(self):
        """The one Pipeline of `sdrt serve -m` (None with a models folder: it depends on the request)."""
        return self.single

    def submit(self, generation: Generation) -> asyncio.Future:
        entry = generation.model or self.models.entries[0]
        used = []  # the Pipeline the job runs on, for its previews

        def run(callback):
            used.append(self.loaded.pipeline(entry))
            return generation.run(used[0], callback)

        job = Job(
            generation.kind,
            run,
            batches=generation.batches,
            preview=lambda denoised: preview_png(used[0], denoised, generation.preview_method),
            preview_every=generation.preview_every,
            task_id=generation.task_id,
        )
        return asyncio.wrap_future(self.worker.submit(job))

    def in_worker(self, kind: str, fn) -> asyncio.Future:
        """Run FN() on the worker thread between jobs (a model switch, unload, reload): an asyncio future."""
        return asyncio.wrap_future(self.worker.submit(Job(kind, lambda callback: fn(), batches=1)))

    async def progress(self, skip_current_image: bool, id_task: str | None = None) -> dict:
        state = self.worker.state
        with state.lock:
            if id_task is not None and state.task_id != id_task:  # not running (waiting, done or unknown)
                return idle_progress()
            done, eta = state.progress()
            image = None if skip_current_image else state.current_image
            state.preview_wanted = state.preview_wanted or not skip_current_image  # the worker decodes it lazily
            return {"progress": done, "eta_relative": eta, "state": state.as_dict(), "current_image": image}

    async def interrupt(self, id_task: str | None = None) -> None:
        self.worker.interrupt(id_task)

    async def skip(self) -> None:
        self.worker.skip()

    def stop(self) -> None:
        self.worker.stop()


def idle_progress() -> dict:
    """A1111's ProgressResponse with no job running."""
    return {"progress": 0.0, "eta_relative": 0.0, "state": State().as_dict(), "current_image": None}
