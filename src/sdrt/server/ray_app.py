"""`sdrt serve --ray`: the A1111-compatible app (app.py, the same routes and page) as a Ray Serve ingress in front of
Generator replicas, each one loaded Pipeline or, with a models folder, an LRU of its models (ray_models.py), one GPU
each when it has GPUs, the CPU otherwise.

    client -> Ray Serve proxy -> Ingress (create_app over RayBackend) -> DeploymentHandle -> Generator replicas
                                       \\-> JobBoard actor <- replicas report progress, read interrupts

- Batching: compatible txt2img requests (same options but prompt, negative prompt, seeds and batch_size;
  runtime/batching.py) that reach one replica within `batch_wait_s` share one UNet batch of at most
  `max_batch_size` images (@serve.batch); each image is the one its request gets alone, bit for bit.
- Queueing: Ray Serve queues at most `max_queued_requests` requests at the ingress's handle beyond what the
  replicas hold (`max_ongoing_requests` each); past that the request gets HTTP 429 with Retry-After.
- A replica that dies: Ray Serve re-sends the requests it held to a live replica where it can and starts a new
  replica; a request lost all the same gets HTTP 503 with Retry-After (a retry goes to a live replica).
- Progress and interrupt: replicas report every running job, by its task id (A1111's force_task_id, or one the
  ingress makes), to one JobBoard actor; /sdapi/v1/progress?id_task= reads it; without id_task it reports the
  oldest running job (in one process: the only one); /sdapi/v1/interrupt stops every running job, or with id_task
  that one.

`serve run sdrt.server.ray_app:build_app model=/shared/models/sd15 replicas=2` (or a `serve deploy` config file
with `import_path: sdrt.server.ray_app:build_app` and these `args`) runs it on an existing cluster.
"""

import asyncio
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, fields, replace

from ray import serve

from sdrt.errors import InvalidOption, SdrtError
from sdrt.server.ray_models import ray_extras
from sdrt.server.ray_progress import JobBoard, Reporter

INGRESS_MAX_ONGOING = 1000  # the ingress only waits on handles: requests it holds at once
SECONDS_GUESS = 5.0  # a job's duration before the first one finished (for Retry-After)
DURATION_SMOOTHING = 0.3  # weight of the newest job in the running mean of job durations
log = logging.getLogger("ray.serve")  # Ray Serve's replica logger: the replica's log file and the driver's stderr


@dataclass(frozen=True)
class RayOptions:
    """The Ray Serve application's settings (`sdrt serve --ray` flags, `serve run ... key=value` args)."""

    model: str | None = None  # an exported model folder (the same path on every node), or with models_dir the
    # default model's name in that folder
    backend: str | None = None  # each replica's Pipeline backend; None: auto on GPU replicas, else cpu (as sdrt serve)
    replicas: str = "1"  # a number, or "auto": Ray Serve's autoscaling between min and max
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 2.0  # autoscaling: requests per replica it aims at
    gpus_per_replica: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_replica: float = 1.0
    max_batch_size: int = 4  # images in one UNet batch (1: no batching)
    batch_wait_s: float = 0.05  # how long a batch waits for compatible requests
    max_ongoing_requests: int = 0  # per replica, waiting for a batch included; 0: 2 * max_batch_size
    max_queued_requests: int = 8  # at the ingress beyond what the replicas hold; then HTTP 429
    lora_dir: str | None = None  # a folder of LoRA files every replica offers (<lora:name:w>), on shared storage
    models_dir: str | None = None  # a models folder (sdrt serve --models-dir): each replica an LRU of its models
    max_loaded_models: int = 1  # each replica's LRU size (with models_dir)
    models_memory: str | None = None  # each replica's LRU budget of weights ("12GB"; with models_dir)
    vae_dir: str | None = None  # A1111's models/VAE (sd_vae): the ingress exports a VAE, replicas load the export
    upscaler_dir: str | None = None  # exported upscalers (hires fix, extras), on shared storage: replicas + ingress

    @classmethod
    def from_args(cls, args: dict) -> "RayOptions":
        """From `serve run` key=value strings (or typed values), each checked: InvalidOption names the bad one."""
        known = {f.name: f for f in fields(cls)}
        unknown = set(args) - set(known)
        if unknown:
            raise InvalidOption(sorted(unknown)[0], args[sorted(unknown)[0]], "one of " + ", ".join(known))
        if "model" not in args and args.get("models_dir") in (None, "", "none"):
            raise InvalidOption("model", None, "an exported model folder (or models_dir: a folder of models)")
        typed = {}
        for name, value in args.items():
            kind = {"model": str, "backend": str, "replicas": str, "lora_dir": str, "models_dir": str,
                    "models_memory": str, "vae_dir": str, "upscaler_dir": str}.get(name)  # fmt: skip
            if kind is None:
                kind = int if known[name].type in (int, "int") else float
            try:
                typed[name] = None if value in (None, "", "none") else kind(value)
            except (TypeError, ValueError):
                raise InvalidOption(name, value, f"a{'n integer' if kind is int else ' number'}") from None
        return cls(**typed).checked()

    def checked(self) -> "RayOptions":
        if self.replicas != "auto" and not (self.replicas.isdigit() and int(self.replicas) >= 1):
            raise InvalidOption("replicas", self.replicas, "a positive number or auto")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise InvalidOption("min_replicas", self.min_replicas, f"1 to max_replicas ({self.max_replicas})")
        names = ("max_batch_size", "max_queued_requests", "target_ongoing_requests", "cpus_per_replica",
                 "max_loaded_models")  # fmt: skip
        for name in names:
            if getattr(self, name) <= 0:
                raise InvalidOption(name, getattr(self, name), "a positive number")
        for name in ("batch_wait_s", "gpus_per_replica", "max_ongoing_requests"):
            if (getattr(self, name) or 0) < 0:
                raise InvalidOption(name, getattr(self, name), "0 or more")
        if self.models_memory is not None:
            from sdrt.engines.plan import parse_size

            parse_size(self.models_memory, "models_memory")
        return self

    def ongoing(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size


def gpus_in_cluster() -> float:
    """The cluster's GPUs; 0 where Ray is not started yet (`serve run` builds the app first: set
    gpus_per_replica there)."""
    import ray

    if not ray.is_initialized():
        print("sdrt: Ray not started while building the app: gpus_per_replica 0 unless set", file=sys.stderr)
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0))


def deployment_options(options: RayOptions) -> dict:
    """Ray Serve options of the Generator deployment: replicas or autoscaling, resources, queue limits."""
    gpus = options.gpus_per_replica
    scaling = {"num_replicas": int(options.replicas)}
    if options.replicas == "auto":
        scaling = {
            "autoscaling_config": {
                "min_replicas": options.min_replicas,
                "max_replicas": options.max_replicas,
                "target_ongoing_requests": options.target_ongoing_requests,
            }
        }
    return {
        **scaling,
        "ray_actor_options": {"num_cpus": options.cpus_per_replica, "num_gpus": gpus},
        "max_ongoing_requests": options.ongoing(),
        "max_queued_requests": options.max_queued_requests,
    }


class Generator:
    """One replica: one loaded Pipeline; one Pipeline call at a time; compatible txt2img requests batched."""

    def __init__(self, model: str | None, backend: str, max_batch_size: int, batch_wait_s: float, lora_dir=None,
                 lru: tuple = (1, None), upscaler_dir=None):  # fmt: skip
        """MODEL: the one exported folder, or None (a models folder): an LRU of LRU = (max_loaded, budget)."""
        from sdrt.runtime.pipeline import Pipeline
        from sdrt.server.ray_models import ReplicaModels

        def load(folder):
            return Pipeline.load(folder, backend=backend, loras=lora_dir, upscalers=upscaler_dir)
        self.models = ReplicaModels(model, load, *lru)
        self.lock = asyncio.Lock()  # the Pipeline is not thread safe
        self.max_batch_size = max_batch_size
        self.batched.set_max_batch_size(max_batch_size)
        self.batched.set_batch_wait_timeout_s(batch_wait_s)

    def pid(self) -> int:
        """This replica's process id (the fault test kills it)."""
        return os.getpid()

    async def generate(self, generation, board) -> list:
        """GENERATION's PIL images, in a UNet batch with compatible requests where it can share one."""
        key = self.batch_key(generation)
        if key is not None:
            result = await self.batched((generation, key, board))
            if isinstance(result, BaseException):
                raise result
            return result
        async with self.lock:
            return await asyncio.to_thread(self.run_alone, generation, board)

    def batch_key(self, generation):
        from sdrt.runtime import batching

        request = generation.batch_request()
        if self.max_batch_size < 2 or request is None or request.get("batch_size", 1) > self.max_batch_size:
            return None
        try:
            key = batching.batch_key(batching.options_of(self.models.options_holder(generation.model), request))
        except SdrtError:
            return None  # runs alone, where generate() names the bad option
        return None if key is None else (self.models.key(generation.model), key)

    def run_alone(self, generation, board) -> list:
        pipe = self.models.pipeline(generation.model)  # loaded (the LRU's oldest unloaded) between jobs
        reporter = Reporter(board, pipe, [generation], [0])
        try:
            return generation.run(pipe, reporter)
        finally:
            reporter.close()

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05, batch_size_fn=lambda items: count_images(items))
    async def batched(self, items: list) -> list:
        """ITEMS [(generation, batch key, board)] that came together: one Pipeline call per batch key."""
        groups: dict = {}
        for index, (_, key, _) in enumerate(items):
            groups.setdefault(key, []).append(index)
        results: list = [None] * len(items)
        for members in groups.values():
            generations = [items[i][0] for i in members]
            async with self.lock:
                try:
                    outcome = await asyncio.to_thread(self.run_batch, generations, items[members[0]][2])
                except Exception as e:  # every request of the batch gets it
                    outcome = [e] * len(members)
            for i, images in zip(members, outcome, strict=True):
                results[i] = images
        return results

    def run_batch(self, generations: list, board) -> list:
        from sdrt.runtime import batching

        counts = [g.kwargs.get("batch_size", 1) for g in generations]
        offsets = [sum(counts[:i]) for i in range(len(counts))]
        log.info("sdrt batch: %d requests, %d images in one batched Pipeline call", len(generations), sum(counts))
        pipe = self.models.pipeline(generations[0].model)  # one model per batch key
        reporter = Reporter(board, pipe, generations, offsets)
        try:
            out = batching.generate_batch(pipe, [g.batch_request() for g in generations], callback=reporter)
        finally:
            reporter.close()
        # an interrupted job gets what it gets alone: no images (its only batch did not finish)
        return [[] if g.task_id in reporter.interrupted else images for g, images in zip(generations, out, strict=True)]


def count_images(items: list) -> int:
    """Images in a batch of Generator.batched items: @serve.batch's max_batch_size counts images."""
    return sum(generation.kwargs.get("batch_size", 1) for generation, _, _ in items)


def upscaler_set(folder: str | None):
    """The upscalers of FOLDER as the replicas load them: the ingress lists them, checks hires requests against them
    and runs extras jobs with them on its own CPU (ONNX Runtime, one job at a time: extras_api.py)."""
    from sdrt.runtime.upscale import UpscalerSet

    upscalers = UpscalerSet()
    if folder is not None:
        upscalers.load_dir(folder)
    return upscalers


class RayBackend:
    """generation.py's backend seam over a Generator DeploymentHandle and the JobBoard."""

    def __init__(self, generator, manifest, board, options: RayOptions, models=None):
        self.generator, self.manifest, self.board, self.options = generator, manifest, board, options
        self.models = models  # a models.ModelRegistry of options.models_dir (None: the one model's, app.py makes it)
        self.lora_dir = options.lora_dir  # what the replicas load (GET /sdapi/v1/loras lists it)
        self.upscalers = upscaler_set(options.upscaler_dir)  # listings, hires checks, extras jobs (this process)
        self.mean_seconds = SECONDS_GUESS

    def retry_after(self, waiting: int) -> int:
        per_round = max(self.options.max_batch_size, 1)
        return max(1, math.ceil(self.mean_seconds * max(1, waiting / per_round)))

    def submit(self, generation) -> asyncio.Future:
        response = self.generator.generate.remote(generation, self.board)
        task = asyncio.ensure_future(self.result(response, generation.task_id))
        task.add_done_callback(lambda t: response.cancel() if t.cancelled() else None)
        return task

    async def result(self, response, task_id: str) -> list:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError

        from sdrt.server.jobs import QueueFull, Unavailable

        start = time.monotonic()
        try:
            images = await response
        except BackPressureError as e:
            raise QueueFull(self.retry_after(e.args[0] if e.args else 1), self.options.max_queued_requests) from None
        except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
            raise Unavailable(self.retry_after(1), f"the replica running this job was lost ({type(e).__name__})") from e
        finally:
            self.board.end.remote([task_id])  # a replica that died cannot say so itself
        self.mean_seconds += DURATION_SMOOTHING * (time.monotonic() - start - self.mean_seconds)
        return images

    async def progress(self, skip_current_image: bool, id_task: str | None = None) -> dict:
        return await self.board.progress.remote(skip_current_image, id_task)

    async def interrupt(self, id_task: str | None = None) -> None:
        await self.board.interrupt.remote(id_task)

    def stop(self) -> None:
        pass


class Ingress:
    """The FastAPI app of `sdrt serve` (create_app) over a RayBackend; the JobBoard lives with it."""

    def __init__(self, generator, options: RayOptions, limits, credentials, exporter=None, vae_exporter=None):
        """EXPORTER(path) -> exported folder: how a models folder's checkpoints are exported (the CLI's cache);
        VAE_EXPORTER(source, model, field) -> exported VAE folder: the same for vae_dir's VAEs."""
        import ray

        from sdrt.runtime.manifest import Manifest
        from sdrt.server.ray_models import ingress_registry

        self.board = ray.remote(JobBoard).options(num_cpus=0).remote()
        models = ingress_registry(options.models_dir, exporter)
        manifest = Manifest.load(options.model) if models is None else None
        self.backend = RayBackend(generator, manifest, self.board, options, models)
        self.limits, self.credentials, self.options = limits, credentials, options
        self.extras = ray_extras(options, vae_exporter)

    def __serve_build_asgi_app__(self):
        from sdrt.server.app import create_app
        from sdrt.server.ray_models import start_options

        app = create_app(limits=self.limits, credentials=self.credentials, backend=self.backend, extras=self.extras)
        if self.options.models_dir is not None:
            start_options(app.state.server, self.options.model, self.options.max_loaded_models)
        return app


def with_defaults(options: RayOptions) -> RayOptions:
    """OPTIONS with an absolute model path, GPUs per replica (1 if the cluster has GPUs) and the replicas'
    backend: auto (the fastest engine) on GPU replicas, cpu on CPU replicas (sdrt serve's default: the same bits)."""
    if options.models_dir is None:
        options = replace(options, model=os.path.abspath(options.model))
    else:
        options = replace(options, models_dir=os.path.abspath(options.models_dir))
    if options.upscaler_dir is not None:
        options = replace(options, upscaler_dir=os.path.abspath(options.upscaler_dir))
    if options.gpus_per_replica is None:
        options = replace(options, gpus_per_replica=1.0 if gpus_in_cluster() > 0 else 0.0)
    if options.backend is None:
        options = replace(options, backend="auto" if options.gpus_per_replica else "cpu")
    return options


def build(options: RayOptions, limits=None, credentials: dict | None = None, exporter=None, vae_exporter=None):
    """The Ray Serve Application: the Ingress bound to the Generator deployment; EXPORTER(path) -> exported folder
    exports a models folder's checkpoints (None: its exported models only), VAE_EXPORTER vae_dir's VAEs."""
    from sdrt.engines.plan import parse_size
    from sdrt.server.app import Limits

    options = with_defaults(options)
    generator = serve.deployment(Generator).options(name="Generator", **deployment_options(options))
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name="Ingress", num_replicas=1, max_ongoing_requests=INGRESS_MAX_ONGOING, ray_actor_options={"num_cpus": 0}
    )
    budget = None if options.models_memory is None else parse_size(options.models_memory, "models_memory")
    replica_model = options.model if options.models_dir is None else None  # a folder: each replica's LRU
    bound = generator.bind(replica_model, options.backend, options.max_batch_size, options.batch_wait_s,
                           options.lora_dir, (options.max_loaded_models, budget), options.upscaler_dir)  # fmt: skip
    return ingress.bind(bound, options, limits or Limits(), credentials, exporter, vae_exporter)


def build_app(args: dict):
    """`serve run sdrt.server.ray_app:build_app model=... [replicas=auto ...]`: RayOptions' fields as args, and
    api_auth=user:password as `sdrt serve --api-auth`."""
    from sdrt.server.app import parse_credentials

    args = dict(args)
    auth = args.pop("api_auth", None)
    return build(RayOptions.from_args(args), credentials=parse_credentials(auth) if auth else None)


def serve_ray(options: RayOptions, host: str, port: int, api_auth: str | None, limits, address: str | None,
              exporter=None, vae_exporter=None) -> int:  # fmt: skip
    """`sdrt serve --ray`: connect to the cluster at ADDRESS (None: start a local one), run the app on HOST:PORT
    through Ray Serve's proxy, and serve until interrupted; EXPORTER: as build's."""
    import ray

    from sdrt.server.app import LOOPBACK, parse_credentials

    credentials = parse_credentials(api_auth) if api_auth else None
    ray.init(address=address or "local", include_dashboard=False, logging_level="warning")
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(options, limits, credentials, exporter, vae_exporter), name="sdrt", route_prefix="/")
        if host not in LOOPBACK and not credentials:
            print(f"sdrt serve: note: {host} without --api-auth: whoever reaches this port can use it", file=sys.stderr)
        print(f"sdrt serve --ray: http://{host}:{port}/ (API docs at /docs)", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if address is None:  # the local cluster started here
            serve.shutdown()
        else:  # a shared cluster keeps its other applications
            serve.delete("sdrt")
        ray.shutdown()
    return 0
