"""`sdrt serve --ray` (server/ray_app.py) as a real process on loopback: a local Ray cluster, 2 Generator replicas
serving a models folder (the tiny model, the default, and a second tiny model: each replica an LRU of 2), one
module-scoped server for every test here (Ray starts in about 30 s).

The same A1111 API as `sdrt serve` (images bit for bit those of the Python API, alone or batched), auth, 429 with
Retry-After, progress and interrupt by task id, a Schemathesis fuzz, and a load test during which one replica
process is killed: every request gets its own image (a 503/429 is retried), none hangs, the replica comes back.

No test here hopes for a timing (CI: a 2-core machine, quiet or loaded). The server runs through tests/ray_gate.py,
whose replicas can hold requests at a gate (`ray_gate.holding()`) and pause running jobs at a step
(`ray_gate.pausing(step)`): the batching and queue tests fill the replicas with held requests and open the gate when
the condition they check exists; the progress tests pause a job of LONG_STEPS steps (--max-steps allows them)
wherever they look at it, and it ends by an interrupt.
"""

import contextlib
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from ray_gate import GATE_ENV
from server_fixture import decode_b64, gradient, png_b64, start_server, stop_server

from sdrt.errors import InvalidOption

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install 'sdrt[ray]'")
psutil = pytest.importorskip("psutil")

AUTH = ("sdrt", "secret")
REPLICAS, BATCH, QUEUE, ONGOING = 2, 4, 4, 4
A1111_MAX_STEPS = 150  # sdrt serve's default --max-steps (A1111's slider)
LONG_STEPS = 1000  # the most a job may have (runtime/options.py): the gate pauses it; it ends by an interrupt
RAY_ARGS = (
    "--ray", "--backend", "cpu", "--replicas", str(REPLICAS), "--ray-batch-size", str(BATCH), "--batch-wait-s", "0.2",
    "--max-queue", str(QUEUE), "--max-ongoing-requests", str(ONGOING), "--cpus-per-replica", "1",
    "--max-pixels", str(96 * 96), "--max-images", "4", "--max-steps", str(LONG_STEPS), "--api-auth", ":".join(AUTH),
)  # fmt: skip
START_TIMEOUT_S = 240  # Ray and Serve start, two replicas load the model (2 busy cores in CI)
SMALL = {"width": 64, "height": 64, "steps": 4}
GENERATOR = "ServeReplica:sdrt:Generator"  # the replicas' process title


def descendants(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def generator_processes(server) -> list:
    found = []
    for p in descendants(server.process.pid):
        try:
            if GENERATOR in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="module")
def ray_models(tiny_sd, tiny_sd_v, tmp_path_factory):
    """alpha (tiny SD: what the tests without a model ask get), beta (the tiny v-prediction model), a non-model."""
    root = tmp_path_factory.mktemp("ray-models")
    (root / "alpha").symlink_to(tiny_sd[1], target_is_directory=True)
    (root / "beta").symlink_to(tiny_sd_v[1], target_is_directory=True)
    (root / "notes.txt").write_text("not a model")
    return root


@pytest.fixture(scope="module")
def ray_vaes(tiny_sd, tmp_path_factory):
    """A VAE folder (tiny VAE files, tests/tiny_vae_files.py) and the export cache the server and tests share."""
    from tiny_vae_files import tiny_swap_vae, write_vae_files

    root = tmp_path_factory.mktemp("ray-vae")
    files = write_vae_files(tiny_swap_vae(5, tiny_sd[0].vae.config.scaling_factor), root / "VAE")
    patch = pytest.MonkeyPatch()
    patch.setenv("SDRT_CACHE", str(root / "cache"))  # the Ray processes inherit it: the ingress exports there
    patch.setenv("RAY_DEDUP_LOGS", "0")  # Ray folds log lines differing only in numbers ("2 requests" into "1 ...")
    yield root / "VAE", files
    patch.undo()


class Gate:
    """The gate of the replicas (tests/ray_gate.py) in FOLDER: within `holding()` every request reaching a replica
    waits there (one of the replica's ongoing requests) and says so in FOLDER/arrived; the block's end lets them on
    together. Each batched Pipeline call is recorded in FOLDER/batches."""

    def __init__(self, folder: Path):
        self.folder = folder
        for name in ("arrived", "batches"):
            (folder / name).mkdir()

    @contextlib.contextmanager
    def holding(self):
        for old in [*(self.folder / "arrived").iterdir(), *(self.folder / "batches").iterdir()]:
            old.unlink()
        (self.folder / "hold").touch()
        try:
            yield self
        finally:
            (self.folder / "hold").unlink()

    def arrived(self) -> list[str]:
        """The requests held since `holding()` began, as "<replica pid>-<task id>"."""
        return sorted(p.name for p in (self.folder / "arrived").iterdir())

    @contextlib.contextmanager
    def pausing(self, step: int):
        """Within the block, a running job stops once it has reported STEP (or the step a later pause_at names)."""
        self.pause_at(step)
        try:
            yield self
        finally:
            (self.folder / "pause-at").unlink()

    def pause_at(self, step: int) -> None:
        (self.folder / "pause-at.new").write_text(str(step))
        (self.folder / "pause-at.new").replace(self.folder / "pause-at")  # the replicas never read half a number

    def batches(self) -> list[list[str]]:
        """The requests of each batched Pipeline call since `holding()` began, as arrived() names them."""
        return sorted(sorted(p.read_text().split("\n")) for p in (self.folder / "batches").iterdir())

    def wait_arrived(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.arrived()) < count:
            assert time.monotonic() < deadline, f"{len(self.arrived())} of {count} requests reached the replicas"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def ray_gate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-gate")
    patch = pytest.MonkeyPatch()
    patch.setenv(GATE_ENV, str(folder))  # the replicas inherit it
    yield Gate(folder)
    patch.undo()


@pytest.fixture(scope="module")
def ray_server(ray_models, ray_vaes, ray_gate, tiny_upscalers, tmp_path_factory):
    upscalers = ("--upscaler-dir", str(tiny_upscalers["rrdb_x2"].parent))  # every replica and the ingress load it
    folder = ("--models-dir", str(ray_models), "-m", "alpha", "--max-loaded-models", "2", "--vae-dir", str(ray_vaes[0]))
    entry = (str(Path(__file__).with_name("ray_gate.py")),)  # sdrt's CLI, its replicas gated
    patch = pytest.MonkeyPatch()  # Ray Serve kills a proxy not ready in 3 checks of 5 s (seen on a loaded 2-core box)
    patch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", str(START_TIMEOUT_S // 3))
    try:
        server = start_server(None, tmp_path_factory.mktemp("ray"), *folder, *RAY_ARGS, *upscalers, auth=AUTH,
                              timeout=START_TIMEOUT_S, entry=entry)  # fmt: skip
    finally:
        patch.undo()  # the processes started have it
    started = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S  # the proxy answers before the app is deployed
        while server.get("/sdapi/v1/sd-models").status_code != 200:
            assert time.monotonic() < deadline and server.process.poll() is None, server.log()[-3000:]
            time.sleep(0.5)
        while len(generator_processes(server)) < REPLICAS:
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.5)
        started = descendants(server.process.pid)
        yield server
    finally:
        started = started or descendants(server.process.pid)
        stop_server(server)
        for p in started:  # Ray's own processes (GCS, raylet, workers) end with the cluster; make sure
            try:
                p.kill()
            except psutil.Error:
                pass


def txt2img(server, **fields):
    res = server.post("/sdapi/v1/txt2img", {"prompt": "a cat", **SMALL, **fields})
    assert res.status_code == 200, res.text
    return res.json()


def txt2img_retrying(server, attempts: int = 10, **fields) -> dict:
    """txt2img, retried after a 429 (Ray Serve counts requests waiting for a replica's answer as queued)."""
    for _ in range(attempts):
        res = server.post("/sdapi/v1/txt2img", {"prompt": "a cat", **SMALL, **fields})
        if res.status_code != 429:
            assert res.status_code == 200, res.text
            return res.json()
        time.sleep(min(int(res.headers["Retry-After"]), 1))
    raise AssertionError(f"still 429 after {attempts} attempts")


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_ray_flags_checked_before_ray_starts(tiny_sd, ray_models, capsys):
    """Bad --ray values (and Ray flags without --ray) exit with code 2 naming the flag, before any cluster."""
    from sdrt.cli import main
    from sdrt.server.ray_app import RayOptions

    model = str(tiny_sd[1])
    assert main(["serve", "-m", model, "--replicas", "2"]) == 2
    assert "--replicas: got '2'; allowed: only with --ray" in capsys.readouterr().err
    assert main(["serve", "-m", model, "--ray", "--replicas", "zero"]) == 2
    assert "replicas: got 'zero'" in capsys.readouterr().err
    assert main(["serve", "-m", model, "--ray", "--min-replicas", "5"]) == 2
    assert "min_replicas: got 5; allowed: 1 to max_replicas (4)" in capsys.readouterr().err
    assert main(["serve", "-m", str(tiny_sd[1].parent), "--ray"]) == 2  # not an exported folder
    assert main(["serve", "-m", model, "--ray", "--upscaler-dir", str(tiny_sd[1].parent / "nowhere")]) == 2
    assert "upscaler_dir: got" in capsys.readouterr().err
    options = RayOptions.from_args({"model": model, "replicas": "auto", "max_batch_size": "8", "batch_wait_s": "0"})
    assert options.max_batch_size == 8 and options.ongoing() == 16 and options.batch_wait_s == 0.0
    from sdrt.server.ray_app import with_defaults

    cpu = with_defaults(RayOptions.from_args({"model": model}))  # Ray not started here: 0 GPUs
    assert cpu.backend == "cpu" and cpu.gpus_per_replica == 0  # sdrt serve's backend: the same bits
    gpu = with_defaults(RayOptions.from_args({"model": model, "gpus_per_replica": "1"}))
    assert gpu.backend == "auto" and with_defaults(RayOptions(model, backend="cuda")).backend == "cuda"
    with pytest.raises(InvalidOption, match="max_batch_size: got 'many'"):
        RayOptions.from_args({"model": model, "max_batch_size": "many"})
    with pytest.raises(InvalidOption, match="colour"):
        RayOptions.from_args({"model": model, "colour": "red"})
    folder = ["serve", "--ray", "--models-dir", str(ray_models)]
    assert main([*folder, "-m", "gamma"]) == 2  # the default model must be in the folder
    assert "--model: got 'gamma'; allowed: one of 'alpha [" in capsys.readouterr().err
    assert main([*folder, "--max-loaded-models", "0"]) == 2
    assert "--max-loaded-models: got 0" in capsys.readouterr().err
    assert main([*folder, "--models-memory", "lots"]) == 2
    assert "--models-memory: got 'lots'" in capsys.readouterr().err
    assert main([*folder, "--vae-dir", str(ray_models / "missing")]) == 2
    assert "--vae-dir: got" in capsys.readouterr().err
    assert main([*folder, "--models-memory", "lots"]) == 2
    assert "--models-memory: got 'lots'" in capsys.readouterr().err
    options = with_defaults(RayOptions.from_args({"models_dir": str(ray_models), "max_loaded_models": "3"}))
    assert options.model is None and options.max_loaded_models == 3 and os.path.isabs(options.models_dir)
    with pytest.raises(InvalidOption, match="models_memory: got '12 parsecs'"):
        RayOptions.from_args({"models_dir": str(ray_models), "models_memory": "12 parsecs"})
    with pytest.raises(InvalidOption, match="model: got None"):
        RayOptions.from_args({"replicas": "2"})


def test_replica_models_fixed_or_an_lru(tiny_sd, tiny_sd_v):
    """What a replica holds (ray_models.ReplicaModels): with -m one Pipeline, whatever a request's entry says, and one
    batch key part; with a folder an LRU by entry (its size respected) whose batch key part tells models apart."""
    from sdrt.server.models import ModelEntry
    from sdrt.server.ray_models import ReplicaModels

    loads = []

    def load(folder):
        loads.append(str(folder))
        return f"pipeline of {folder}"

    alpha = ModelEntry("alpha", tiny_sd[1], "exported", exported=tiny_sd[1])
    beta = ModelEntry("beta", tiny_sd_v[1], "exported", exported=tiny_sd_v[1])
    fixed = ReplicaModels(str(tiny_sd[1]), load)
    assert fixed.pipeline(beta) == f"pipeline of {tiny_sd[1]}" and fixed.key(alpha) is None is fixed.key(beta)
    lru = ReplicaModels(None, load, max_loaded=1)
    assert lru.pipeline(alpha) == f"pipeline of {tiny_sd[1]}" == lru.pipeline(alpha)  # loaded once, then the LRU's
    assert lru.pipeline(beta) == f"pipeline of {tiny_sd_v[1]}" and lru.loaded.loaded() == [tiny_sd_v[1]]
    assert lru.key(alpha) != lru.key(beta) and lru.manifest(beta).prediction_type == "v_prediction"
    assert loads == [str(tiny_sd[1]), str(tiny_sd[1]), str(tiny_sd_v[1])]  # fixed's, alpha once, beta


def test_ray_backend_maps_ray_errors_to_429_and_503():
    """A full Ray Serve queue is QueueFull (HTTP 429), a lost replica Unavailable (HTTP 503), both with a
    Retry-After of at least 1 s; the JobBoard forgets the job either way. (The load test below rarely sees a 503:
    Ray Serve re-sends a dead replica's requests where it can.)"""
    import asyncio

    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from sdrt.server.generation import Generation
    from sdrt.server.jobs import QueueFull, Unavailable
    from sdrt.server.ray_app import RayBackend, RayOptions

    class Fake:  # .generate.remote(...) and .end.remote(...) as a DeploymentHandle and an actor handle
        def __init__(self, error):
            self.error, self.ended = error, []
            self.generate = self.end = self

        def remote(self, *args):
            if args and isinstance(args[0], list):
                self.ended.extend(args[0])
                return None

            async def fail():
                raise self.error

            return fail()

    for error, expected in ((BackPressureError(9, 8), QueueFull), (ActorDiedError(), Unavailable)):
        fake = Fake(error)
        backend = RayBackend(fake, None, fake, RayOptions(model="m"))
        generation = Generation("txt2img", "a cat", {}, 1, task_id="task(x)")

        async def run(backend=backend, generation=generation):
            return await backend.submit(generation)

        with pytest.raises(expected) as caught:
            asyncio.run(run())
        assert caught.value.retry_after >= 1 and fake.ended == ["task(x)"]


def test_ray_answers_as_one_process(ray_server, tiny_pipeline):
    """A1111's response; images bit for bit Pipeline.generate's (batch_size 2 x n_iter 2 runs alone); auth."""
    body = txt2img(ray_server, seed=11, batch_size=2, n_iter=2, cfg_scale=5, sampler_name="Euler a")
    info = json.loads(body["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and len(body["images"]) == 4
    direct = tiny_pipeline.generate(
        "a cat", **SMALL, seed=11, batch_size=2, batch_count=2, cfg_scale=5, sampler="Euler a", rng="gpu",
        progress=False,
    )  # fmt: skip
    for b64, text, image in zip(body["images"], info["infotexts"], direct, strict=True):
        got = decode_b64(b64)
        assert np.array_equal(pixels(got), pixels(image)) and got.info["parameters"] == text
        assert text == image.info["parameters"]
    init = png_b64(gradient())  # img2img and outpaint carry images to the replica
    edited = ray_server.post("/sdapi/v1/img2img", {"prompt": "x", **SMALL, "init_images": [init], "seed": 4})
    assert edited.status_code == 200 and "Denoising strength: 0.75" in json.loads(edited.json()["info"])["infotexts"][0]
    narrow = png_b64(gradient(56, 64))
    wider = ray_server.post("/sdrt/v1/outpaint", {"prompt": "x", "steps": 4, "image": narrow, "left": 8, "seed": 4})
    assert wider.status_code == 200 and decode_b64(wider.json()["images"][0]).size == (64, 64), wider.text
    assert requests.get(ray_server.url + "/sdapi/v1/sd-models", timeout=10).status_code == 401
    assert requests.get(ray_server.url + "/", auth=("sdrt", "wrong"), timeout=10).status_code == 401
    page = ray_server.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    bad = ray_server.post("/sdapi/v1/txt2img", {"prompt": "x", **SMALL, "sampler_name": "Nope"})
    assert bad.status_code == 422 and "sampler_name" in bad.text
    big = ray_server.post("/sdapi/v1/txt2img", {"prompt": "x", **SMALL, "width": 160})
    assert big.status_code == 422 and "width" in big.text


def test_ray_models_dir_each_request_its_model(ray_server, ray_models, tiny_sd, tiny_sd_v):
    """The folder over Ray: sd-models lists it as sdrt serve does; concurrent requests for alpha and beta
    (override_settings) land on both replicas, never share a UNet batch, and each image is its model's (the Python
    API's); POST options switches the default for the requests after it; refresh-checkpoints finds a new model;
    an unknown title and an LRU size the replicas do not have are 422s."""
    from sdrt import Pipeline

    models = {m["filename"]: m for m in ray_server.get("/sdapi/v1/sd-models").json()}
    assert set(models) == {"alpha", "beta", "notes.txt"} and models["notes.txt"]["unusable"].startswith("not a model")
    alpha, beta = models["alpha"]["title"], models["beta"]["title"]
    assert ray_server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == alpha
    refs = {name: Pipeline.load(folder[1]) for name, folder in (("alpha", tiny_sd), ("beta", tiny_sd_v))}

    def reference(name, seed):
        return pixels(refs[name].generate("a cat", **SMALL, seed=seed, rng="gpu", progress=False)[0])

    def one(i):
        name = ("alpha", "beta")[i % 2]
        override = {"override_settings": {"sd_model_checkpoint": name}} if i % 4 != 0 else {}  # none: the default
        return name, 300 + i, txt2img_retrying(ray_server, seed=300 + i, **override)

    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(one, range(8)))
    for name, seed, body in bodies:
        got = decode_b64(body["images"][0])
        assert np.array_equal(pixels(got), reference(name, seed)), (name, seed)
        assert f"Model hash: {models[name]['hash']}" in got.info["parameters"]
    assert not np.array_equal(reference("alpha", 300), reference("beta", 300))  # the twin: the models differ

    assert ray_server.post("/sdapi/v1/options", {"sd_model_checkpoint": "beta"}).status_code == 200
    try:
        assert ray_server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == beta
        assert np.array_equal(pixels(decode_b64(txt2img(ray_server, seed=5)["images"][0])), reference("beta", 5))
    finally:
        assert ray_server.post("/sdapi/v1/options", {"sd_model_checkpoint": alpha}).status_code == 200
    unknown = ray_server.post("/sdapi/v1/txt2img", {"prompt": "x", **SMALL,
                                                    "override_settings": {"sd_model_checkpoint": "zeta"}})  # fmt: skip
    assert unknown.status_code == 422 and "override_settings.sd_model_checkpoint" in unknown.text
    assert alpha in unknown.text and beta in unknown.text
    limit = ray_server.post("/sdapi/v1/options", {"sd_checkpoints_limit": 3})
    assert limit.status_code == 422 and "--max-loaded-models" in limit.text
    assert ray_server.post("/sdapi/v1/options", {"sd_checkpoints_limit": 2}).status_code == 200  # a round trip
    (ray_models / "delta").symlink_to(tiny_sd[1], target_is_directory=True)
    try:
        assert ray_server.post("/sdapi/v1/refresh-checkpoints").status_code == 200
        listed = {m["filename"] for m in ray_server.get("/sdapi/v1/sd-models").json()}
        assert "delta" in listed
        body = txt2img(ray_server, seed=9, override_settings={"sd_model_checkpoint": "delta"})
        assert np.array_equal(pixels(decode_b64(body["images"][0])), reference("alpha", 9))
    finally:
        (ray_models / "delta").unlink()
        ray_server.post("/sdapi/v1/refresh-checkpoints")


def test_ray_sd_vae_from_the_vae_dir(ray_server, ray_vaes, tiny_sd):
    """--vae-dir over Ray: the ingress lists and exports the VAE, the replica decodes with it (the Python API's image
    with that vae_file, bit for bit; the model's own VAE differs: the twin); an unknown name is a 422."""
    from sdrt import Pipeline
    from sdrt.export.vae_files import export_vae

    assert "swap.safetensors" in [v["model_name"] for v in ray_server.get("/sdapi/v1/sd-vae").json()]
    first = {"prompt": "a cat", **SMALL, "seed": 21, "override_settings": {"sd_vae": "swap.safetensors"}}
    # the first use: the ingress imports torch and exports the VAE (past 60 s on a loaded 2-core machine)
    res = requests.post(ray_server.url + "/sdapi/v1/txt2img", json=first, auth=AUTH, timeout=START_TIMEOUT_S)
    assert res.status_code == 200, res.text
    body = res.json()
    assert json.loads(body["info"])["sd_vae_name"] == "swap.safetensors"
    folder = str(export_vae(str(ray_vaes[1]["safetensors"]), tiny_sd[1], progress=False))  # the ingress's export
    pipe = Pipeline.load(tiny_sd[1])
    want = pipe.generate("a cat", **SMALL, seed=21, rng="gpu", vae_file=folder, progress=False)[0]
    assert np.array_equal(pixels(decode_b64(body["images"][0])), pixels(want))
    own = pipe.generate("a cat", **SMALL, seed=21, rng="gpu", progress=False)[0]
    assert np.abs(pixels(own) - pixels(want)).max() > 20
    bad = ray_server.post("/sdapi/v1/txt2img", {"prompt": "x", **SMALL, "override_settings": {"sd_vae": "nope"}})
    assert bad.status_code == 422 and "override_settings.sd_vae" in bad.text


def test_ray_hires_with_an_image_upscaler_and_extras(ray_server, tiny_sd, tiny_upscalers):
    """--upscaler-dir over Ray: listed by the ingress; hires fix with an exported upscaler on a replica gives
    Pipeline.generate's image bit for bit; extras run in the ingress; an uninstalled name is a 422 listing them."""
    from sdrt import Pipeline
    from sdrt.runtime.upscale import postprocess_upscale

    names = [u["name"] for u in ray_server.get("/sdapi/v1/upscalers").json()]
    assert "rrdb_x2" in names and "compact_prelu" in names
    hires = {"seed": 4, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "rrdb_x2", "hr_second_pass_steps": 2,
             "denoising_strength": 0.5}  # fmt: skip
    body = txt2img(ray_server, **hires)
    local = Pipeline.load(tiny_sd[1], backend="cpu", upscalers=tiny_upscalers["rrdb_x2"].parent)
    direct = local.generate("a cat", **SMALL, seed=4, hires=True, hires_scale=1.5, hires_upscaler="rrdb_x2",
                            hires_steps=2, strength=0.5, rng="gpu", progress=False)[0]  # fmt: skip
    got = decode_b64(body["images"][0])
    assert got.size == (96, 96) and np.array_equal(pixels(got), pixels(direct))
    assert got.info["parameters"] == direct.info["parameters"]
    wrong = ray_server.post("/sdapi/v1/txt2img", {"prompt": "x", **SMALL, **hires, "hr_upscaler": "4x-UltraSharp"})
    assert wrong.status_code == 422 and "rrdb_x2" in wrong.text
    extras = ray_server.post("/sdapi/v1/extra-single-image", {"image": png_b64(gradient(40, 24)),
                                                              "upscaler_1": "rrdb_x2", "upscaling_resize": 2})
    assert extras.status_code == 200 and decode_b64(extras.json()["image"]).size == (80, 48), extras.text
    want = postprocess_upscale(local.upscalers, gradient(40, 24), "rrdb_x2", 0, 2.0)[0]
    assert np.array_equal(pixels(decode_b64(extras.json()["image"])), pixels(want))


def test_ray_batches_compatible_requests_bit_identically(ray_server, ray_gate, tiny_pipeline):
    """Compatible requests (other prompts, negative prompts and seeds) that meet on a replica share one UNet batch.
    The gate holds REPLICAS * ONGOING of them until every replica holds ONGOING (= BATCH), then lets them on
    together (within 10 ms; the batch window is 0.2 s): each replica runs one batch of all its requests, whatever
    the arrival timing. Each image equals its request served alone by the Python API and carries its own prompt and
    seed. Can fail: replicas running each request alone (no batching, or a batch key telling prompts apart) make
    1-request batches; a batch handing out images or seeds in the wrong order fails the bit-for-bit check.
    (The evidence: the gate's record of each Generator.run_batch call, which logs `sdrt batch: N requests`; no
    waiting for Ray to forward the replicas' logs.)"""
    count = REPLICAS * ONGOING
    prompts = [f"a house number {i}" for i in range(count)]

    def one(i):
        return txt2img_retrying(ray_server, prompt=prompts[i], seed=500 + i, negative_prompt="blur" if i % 2 else "",
                                force_task_id=f"task(batch-{i})")  # fmt: skip

    with ThreadPoolExecutor(count) as pool:
        with ray_gate.holding():
            futures = [pool.submit(one, i) for i in range(count)]
            ray_gate.wait_arrived(count)  # every replica full: ONGOING requests each
        bodies = [f.result() for f in futures]
    for i, body in enumerate(bodies):
        info = json.loads(body["info"])
        assert info["all_seeds"] == [500 + i] and info["prompt"] == prompts[i]
        direct = tiny_pipeline.generate(
            prompts[i], **SMALL, seed=500 + i, negative_prompt="blur" if i % 2 else "", rng="gpu", progress=False
        )[0]
        got = decode_b64(body["images"][0])
        assert np.array_equal(pixels(got), pixels(direct)) and got.info["parameters"] == direct.info["parameters"]
    held = {}  # replica pid -> the requests it held
    for name in ray_gate.arrived():
        held.setdefault(name.split("-")[0], []).append(name)
    assert len(held) == REPLICAS and ray_gate.batches() == sorted(held.values())  # each replica: one batch of all


def test_ray_queue_full_is_429_with_retry_after(ray_server, ray_gate):
    """The server holds REPLICAS * ONGOING requests on the replicas plus at least QUEUE in Ray Serve's queue; past
    that a request gets 429 with Retry-After. The gate holds every request reaching a replica, so nothing finishes
    while clients keep sending (a 429 is sent again) until the replicas are full and a request sent after that got
    a 429 (Ray Serve's queue was full then, and stays so); then the gate opens: every client gets its own image or
    a 429 (Retry-After >= 1), and at least REPLICAS * ONGOING + QUEUE got images. (Not exactly that many: Ray Serve
    counts a queued request out of its queue while a full replica turns it down, and may let one more in
    meanwhile.) Can fail: an unbounded queue (no 429), a queue smaller than QUEUE (fewer images), a missing
    Retry-After, a held request lost or answered with another's image."""
    capacity = REPLICAS * ONGOING + QUEUE
    clients = capacity + 8
    full = threading.Event()  # the replicas full and a 429 since: a client answered 429 stops sending
    lock, rejected = threading.Lock(), []  # (when the request was sent, its Retry-After) of each 429

    def one(i):
        while True:
            sent = time.monotonic()
            res = ray_server.post("/sdapi/v1/txt2img", {"prompt": f"q{i}", **SMALL, "seed": i})
            if res.status_code != 429:
                return res
            with lock:
                rejected.append((sent, res.headers.get("Retry-After")))
            if full.is_set():
                return res
            time.sleep(0.1)

    with ThreadPoolExecutor(clients) as pool:
        try:
            with ray_gate.holding():
                futures = [pool.submit(one, i) for i in range(clients)]
                ray_gate.wait_arrived(REPLICAS * ONGOING)
                replicas_full = time.monotonic()  # they stay full: what they hold waits at the gate
                deadline = replicas_full + 60
                while not any(sent > replicas_full for sent, _ in rejected):  # Ray Serve's queue held QUEUE then
                    assert time.monotonic() < deadline, "no 429 with the replicas full"
                    time.sleep(0.05)
                full.set()
        finally:
            full.set()
        answers = [f.result() for f in futures]
    served = [i for i, res in enumerate(answers) if res.status_code == 200]
    assert all(res.status_code in (200, 429) for res in answers), [res.status_code for res in answers]
    print(f"\n429 test: {len(served)} of {clients} clients served, {len(rejected)} answers 429")
    assert len(served) >= capacity, served
    for i in served:
        info = json.loads(answers[i].json()["info"])
        assert len(answers[i].json()["images"]) == 1 and info["prompt"] == f"q{i}" and info["all_seeds"] == [i]
    assert all(int(after) >= 1 for _, after in rejected)


def long_job(server, task_id: str, **fields) -> tuple[threading.Thread, dict]:
    """A txt2img of LONG_STEPS steps as TASK_ID in a thread: (the thread, {"res": its response once answered})."""
    result = {}

    def run():
        result["res"] = server.post("/sdapi/v1/txt2img", {"prompt": "long", **SMALL, "steps": LONG_STEPS,
                                                          "force_task_id": task_id, **fields})  # fmt: skip

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def progress_of(server, task_id: str, **params) -> dict:
    return server.get("/sdapi/v1/progress", params={"id_task": task_id, **params}).json()


def wait_for_step(server, task_id: str, step: int, running: bool = False, timeout_s: float = 60) -> dict:
    """TASK_ID's progress once its job reached STEP (RUNNING: it runs already, and ending first fails at once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        progress = progress_of(server, task_id)
        if progress["state"]["sampling_step"] >= step:
            return progress
        assert not (running and progress["state"]["job"] == ""), f"{task_id} ended before step {step}"
        assert time.monotonic() < deadline, f"{task_id} did not reach step {step}: {progress}"
        time.sleep(0.05)


def test_ray_progress_and_interrupt_by_task_id(ray_server, ray_gate):
    """progress?id_task= follows a job on whichever replica runs it; interrupt with another id leaves it alone (not
    marked interrupted, and it runs on); interrupt with its id stops it (no images, as in one process). The gate
    pauses the job (LONG_STEPS steps) at the step the test names, so it is running, at a known step, whenever the
    test looks; after its interrupt it has hundreds of steps left to notice it. Can fail: an interrupt of every job
    marks it at the other id's interrupt (and ends it before step 25); one ignoring the id lets it end with images."""
    with ray_gate.pausing(5):
        thread, result = long_job(ray_server, "task(long)", seed=1)
        progress = wait_for_step(ray_server, "task(long)", 5)
        state = progress["state"]
        assert state["job"] == "txt2img" and (state["sampling_step"], state["sampling_steps"]) == (5, LONG_STEPS)
        assert 0 < progress["progress"] < 1 and not state["interrupted"], progress
        assert progress_of(ray_server, "task(other)")["state"]["job"] == ""
        assert ray_server.post("/sdapi/v1/interrupt?id_task=task(other)").status_code == 200
        assert not progress_of(ray_server, "task(long)")["state"]["interrupted"]
        ray_gate.pause_at(25)
        later = wait_for_step(ray_server, "task(long)", 25, running=True)["state"]
        assert later["sampling_step"] == 25 and not later["interrupted"] and thread.is_alive()
        assert ray_server.post("/sdapi/v1/interrupt?id_task=task(long)").status_code == 200
        assert progress_of(ray_server, "task(long)")["state"]["interrupted"]
    thread.join(60)  # unpaused: the job stops at the first step the board answers after the interrupt
    assert not thread.is_alive(), "the interrupted job did not stop"
    res = result["res"]
    assert res.status_code == 200 and res.json()["images"] == []
    idle = progress_of(ray_server, "task(long)")
    assert idle["state"]["job"] == "" and idle["progress"] == 0


def test_ray_live_preview_when_polled(ray_server, ray_gate):
    """A poll asking for current_image gets a preview decoded on the replica (lazily: test_ray_previews.py). The gate
    lets the job (LONG_STEPS steps) on 5 steps at a time until a poll finds the preview: it comes, however fast the
    machine, before the job could end."""
    with ray_gate.pausing(5):
        thread, _ = long_job(ray_server, "task(preview)", prompt="preview", seed=2)
        step, image = 5, None
        while True:
            wait_for_step(ray_server, "task(preview)", step, running=step > 5)
            image = progress_of(ray_server, "task(preview)", skip_current_image="false")["current_image"]
            if image is not None or step >= LONG_STEPS - 100:
                break
            step += 5
            ray_gate.pause_at(step)
        assert ray_server.post("/sdapi/v1/interrupt?id_task=task(preview)").status_code == 200
    thread.join(60)
    assert not thread.is_alive() and image is not None
    assert decode_b64(image).size == (8, 8)  # Approx NN -> Approx cheap: latent-sized


def test_ray_fuzz(ray_server):
    """Schemathesis over the Ray app's schema (the same as sdrt serve's): no undeclared 5xx, no hang, alive after."""
    from openapi_fuzz import fuzz

    def bounded(case):  # quick generations: the limits paths are fuzzed on sdrt serve (test_server_fuzz.py)
        if isinstance(case.body, dict) and isinstance(case.body.get("steps"), int) and case.body["steps"] > 8:
            case.body["steps"] = 8
        hires_steps = case.body.get("hr_second_pass_steps") if isinstance(case.body, dict) else None
        if isinstance(hires_steps, int) and hires_steps > A1111_MAX_STEPS:  # a 422, as under the default --max-steps
            case.body["hr_second_pass_steps"] = LONG_STEPS + 1

    statuses = fuzz(ray_server.url, auth=AUTH, examples=12, prepare=bounded, budget_s=90)
    total = sum(statuses.values())
    print(f"\nfuzz sdrt serve --ray: {total} cases, statuses {dict(sorted(statuses.items()))}")
    assert total >= 150 and statuses[200] > 0 and statuses[422] > 0
    txt2img(ray_server, prompt="after fuzz", seed=2)


LOAD_REQUESTS, LOAD_CLIENTS, KILL_AFTER = 40, 6, 10  # the kill comes after KILL_AFTER images
MAX_ATTEMPTS, TIMEOUT_S, LOAD_BUDGET_S = 8, 60, 180


def test_ray_replica_killed_under_load(ray_server):
    """Concurrent clients; one replica process killed mid-load (SIGKILL). Every request gets its own image (its
    prompt and seed in the infotext), after retries of clean 503/429 answers; none hangs; Ray Serve starts a new
    replica, which serves again."""
    done, lock, retries, statuses = [], threading.Lock(), [], []
    killed = {}
    t0 = time.monotonic()

    spans = []  # (start, end) of every attempt

    def one(i):
        request = {"prompt": f"fault {i}", **SMALL, "seed": 7000 + i}
        for attempt in range(MAX_ATTEMPTS):
            sent = time.monotonic()
            res = requests.post(ray_server.url + "/sdapi/v1/txt2img", json=request, auth=AUTH, timeout=TIMEOUT_S)
            with lock:
                statuses.append(res.status_code)
                spans.append((sent, time.monotonic()))
            if res.status_code == 200:
                body = res.json()
                with lock:
                    done.append((i, body, time.monotonic()))
                    if len(done) == KILL_AFTER and not killed:
                        victim = generator_processes(ray_server)[0]
                        killed.update(pid=victim.pid, at=time.monotonic())
                        os.kill(victim.pid, signal.SIGKILL)
                return attempt
            assert res.status_code in (429, 503), (i, res.status_code, res.text[:500])
            assert int(res.headers["Retry-After"]) >= 1
            with lock:
                retries.append(res.status_code)
            time.sleep(min(int(res.headers["Retry-After"]), 2))
        raise AssertionError(f"request {i} not served in {MAX_ATTEMPTS} attempts")

    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        attempts = list(pool.map(one, range(LOAD_REQUESTS)))
    elapsed = time.monotonic() - t0
    assert killed and elapsed < LOAD_BUDGET_S
    assert len(done) == LOAD_REQUESTS
    for i, body, _ in done:
        info = json.loads(body["info"])
        assert info["all_seeds"] == [7000 + i] and info["prompt"] == f"fault {i}"
        text = decode_b64(body["images"][0]).info["parameters"]
        assert text.startswith(f"fault {i}\n") and f"Seed: {7000 + i}," in text
    # the replacement: a new Generator process, which serves requests
    deadline = time.monotonic() + 120
    while True:
        fresh = [p for p in generator_processes(ray_server) if p.pid != killed["pid"]]
        if len(fresh) == REPLICAS:
            break
        assert time.monotonic() < deadline, "no replacement replica"
        time.sleep(0.5)
    new = [p for p in fresh if p.create_time() > time.time() - (time.monotonic() - killed["at"]) - 1]
    assert len(new) == 1
    replaced_at = time.monotonic()
    served_at = None
    while served_at is None and time.monotonic() < deadline:
        before = new[0].cpu_times()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: txt2img_retrying(ray_server, prompt=f"again {i}", seed=i), range(8)))
        after = new[0].cpu_times()
        if after.user + after.system - before.user - before.system > 0.2:
            served_at = time.monotonic()
    assert served_at is not None, "the new replica did not serve"
    after_kill = [at for _, _, at in done if at > killed["at"]]
    in_flight = [end - start for start, end in spans if start < killed["at"] < end]
    print(
        f"\nray fault test: {LOAD_REQUESTS} requests from {LOAD_CLIENTS} clients, {len(done)} images, "
        f"{len(retries)} retries ({retries.count(503)} x 503, {retries.count(429)} x 429), max attempts "
        f"{max(attempts) + 1}, {elapsed:.1f} s; replica killed after {KILL_AFTER} images, "
        f"{len(after_kill)} images after the kill; {len(in_flight)} requests in flight at the kill (longest "
        f"{max(in_flight, default=0):.1f} s); replacement process seen "
        f"{replaced_at - killed['at']:.1f} s after the kill, serving by {served_at - killed['at']:.1f} s"
    )
