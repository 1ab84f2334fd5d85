"""The GPU benchmark's subprocess stages (`python -m sdrt.bench --worker STAGE JOB`): sdrt on ONNX Runtime CUDA or
TensorRT, diffusers (fp16, fp32, torch.compile), `sdrt optimize`, and each graph against PyTorch fp32 on identical
inputs; peak VRAM sampled from NVML while a stage runs. With --cpu-smoke every stage runs on the CPU."""

import threading
import time
from pathlib import Path

from sdrt.bench import flow_arch
from sdrt.bench.common import (
    CFG_SCALE,
    LATENT_DOWNSAMPLE,
    NEGATIVE_PROMPT,
    PROMPT,
    SAMPLER,
    log,
    measure,
    unet_inputs,
)

PARITY_GRAPHS = ("text_encoder", "unet", "vae_decoder")


def platform_of(job: dict) -> dict:
    """What the job runs on: ONNX Runtime backend and fused target, PyTorch device, the provider for raw graphs.
    A --cpu-smoke job runs the same stages on the CPU."""
    if job.get("cpu_smoke"):
        return {"backend": "cpu", "target": "cpu", "torch_device": "cpu", "provider": "CPUExecutionProvider"}
    return {"backend": "cuda", "target": "cuda", "torch_device": "cuda", "provider": "CUDAExecutionProvider"}


class VramMonitor:
    """Peak device memory in use (NVML), sampled in a thread, minus what was in use when it started."""

    def __init__(self, device: int = 0, period_s: float = 0.005):
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(device)
        self.period_s, self.baseline = period_s, self.used()
        self.peak, self._stop = self.baseline, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(self.period_s)

    def stop(self) -> int:
        """Stop sampling; the peak bytes above the baseline."""
        self._stop.set()
        self._thread.join()
        return self.peak - self.baseline


def vram_monitor(job: dict):
    """A VramMonitor, or for a CPU smoke run one that reports None."""
    if job.get("cpu_smoke"):
        return type("NoVram", (), {"stop": lambda self: None})()
    return VramMonitor()


def _sdrt_generate(pipe, job, batch):
    guidance = (flow_arch.FLOW_KINDS.get(job.get("pipeline")) or {}).get("sdrt") or {"cfg_scale": CFG_SCALE}
    return pipe.generate(
        PROMPT, negative_prompt=NEGATIVE_PROMPT, width=job["width"], height=job["height"], steps=job["steps"],
        sampler=SAMPLER, seed=job["seed"], batch_size=batch, progress=False, **guidance,
    )  # fmt: skip


def worker_sdrt_gpu(job: dict) -> dict:
    """sdrt on "tensorrt" (engines built here, timed) or "cuda" (ONNX Runtime CUDA): the fp16 export, or with
    job["fused"] the fused graphs, with job["static"] at a static profile per batch size (CUDA graphs).
    job["peak_only"]: load and one batch-1 image, for the peak VRAM of batch 1 alone."""
    import numpy as np

    from sdrt.bench.common import block_torch

    block_torch()
    from sdrt.engines.plan import ShapeRanges
    from sdrt.runtime.pipeline import Pipeline

    backend, size, batches = job["backend"], job["width"], job["batches"]
    fused, static = bool(job.get("fused")), bool(job.get("static"))
    built = {}
    if backend == "tensorrt" and not job.get("peak_only"):
        from sdrt.export.build_trt import build

        for label, ranges in (
            ("static batch 1", ShapeRanges.static(1, size, size)),
            (f"dynamic batch 1-{max(batches)}", ShapeRanges((1, 1, max(batches)), (size,) * 3, (size,) * 3, (1, 1, 1))),
        ):
            start = time.perf_counter()
            build(job["onnx_dir"], ranges, progress=False, weight_streaming=bool(job.get("vram_budget")))
            built[label] = time.perf_counter() - start
            log(f"sdrt {backend}: built {label} engines in {built[label]:.1f} s")

    def load(batch):
        return Pipeline.load(job["onnx_dir"], backend=backend, vram_budget=job.get("vram_budget"), fused=fused,
                             static=(size, size, batch) if static else None)  # fmt: skip

    monitor = vram_monitor(job)
    start = time.perf_counter()
    pipe = load(1)
    load_s = time.perf_counter() - start
    if job.get("peak_only"):
        _sdrt_generate(pipe, job, 1)
        return {"peak_vram_bytes": monitor.stop(), "load_s": load_s}
    probe = flow_arch.sdrt_probe(pipe, job, 2)  # a flow case: the transformer, one guided step
    if probe is None:
        sample, timestep, context = unet_inputs(job)
        probe = pipe.engines["unet"], {"sample": sample, "timestep": timestep, "encoder_hidden_states": context}, {}
    unet, feeds, _ = probe
    unet_stats = measure(f"{job['name']} UNet", lambda: unet.run(feeds), job["runs"] * 5)
    images = {}
    e2e = measure(f"{job['name']} txt2img", lambda: images.update(one=_sdrt_generate(pipe, job, 1)), job["runs"])
    np.save(Path(job["out_dir"]) / f"{job['name']}_image.npy", np.asarray(images["one"][0]))
    memcpy = {name: getattr(engine, "memcpy_nodes", None) for name, engine in pipe.engines.items()}
    graphs = {name: str(getattr(engine, "model_file", "")) for name, engine in pipe.engines.items()}
    cuda_graph = {name: getattr(engine, "cuda_graph", None) for name, engine in pipe.engines.items()}
    throughput = {}
    for b in batches:
        runner = pipe if b == 1 or not static else load(b)  # a static profile holds one batch size
        stats = measure(f"{job['name']} batch {b}", lambda b=b, r=runner: _sdrt_generate(r, job, b),
                        max(1, job["runs"] // 2))  # fmt: skip
        throughput[str(b)] = {"median_s": stats["median_s"], "images_per_s": b / stats["median_s"]}
    return {
        "backend": backend, "fused": fused, "static": static, "graphs": graphs, "cuda_graph": cuda_graph,
        "memcpy_nodes": memcpy, "load_s": load_s, "engine_build_s": built,
        "unet_step": {**unet_stats, "it_per_s": 1 / unet_stats["median_s"]},
        "txt2img": e2e, "throughput": throughput, "peak_vram_bytes": monitor.stop(),
    }  # fmt: skip


def worker_diffusers_gpu(job: dict) -> dict:
    """diffusers' StableDiffusionPipeline (a flow case: its own pipeline, flow_arch.py) on the job's device with
    SDPA, in fp16 (job["fp32"]: float32, the parity reference); job["compile"]: torch.compile on the UNet (or
    transformer). job["peak_only"]: one batch-1 image, for its peak VRAM."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionPipeline

    device = platform_of(job)["torch_device"]
    dtype = torch.float32 if job.get("fp32") or device == "cpu" else torch.float16
    if dtype == torch.float32:
        true_fp32(torch)
    monitor = vram_monitor(job)
    flow = flow_arch.FLOW_KINDS.get(job.get("pipeline"))
    if flow is None:
        pipe = StableDiffusionPipeline.from_pretrained(
            job["diffusers_dir"], torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
        ).to(device)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    else:  # SD 3.5, FLUX: their pipeline with its FlowMatchEulerDiscreteScheduler (sdrt's Euler on them)
        pipe = DiffusionPipeline.from_pretrained(job["diffusers_dir"], torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    network = "unet" if flow is None else "transformer"
    attention = type(next(iter(getattr(pipe, network).attn_processors.values()))).__name__
    compile_s = None
    if job.get("compile"):
        start = time.perf_counter()
        setattr(pipe, network, torch.compile(getattr(pipe, network), mode="max-autotune", fullgraph=True))
        compile_s = time.perf_counter() - start  # plus the first call's compilation, inside the warm-up
    to_tensor = lambda x: torch.from_numpy(x).to(device, dtype)  # noqa: E731
    probe = flow_arch.diffusers_probe(pipe, job, 2, job["onnx_dir"], to_tensor)
    if probe is None:
        sample, timestep, context = (to_tensor(x) for x in unet_inputs(job))
        probe = (lambda: pipe.unet(sample, timestep, context, return_dict=False)), {"guidance_scale": CFG_SCALE}
    denoiser, guidance = probe

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def unet_call():
        with torch.inference_mode():
            denoiser()
        sync()

    def generate(batch):
        with torch.inference_mode():
            out = pipe(
                PROMPT, negative_prompt=NEGATIVE_PROMPT, width=job["width"], height=job["height"],
                num_inference_steps=job["steps"], num_images_per_prompt=batch, **guidance,
                generator=torch.Generator("cpu").manual_seed(job["seed"]),
            )  # fmt: skip
        sync()
        return out.images

    if job.get("peak_only"):
        generate(1)
        return {"peak_vram_bytes": monitor.stop()}
    label = job["name"]
    unet_stats = measure(f"{label} UNet", unet_call, job["runs"] * 5)
    images = {}
    e2e = measure(f"{label} txt2img", lambda: images.update(one=generate(1)), job["runs"])
    np.save(Path(job["out_dir"]) / f"{label}_image.npy", np.asarray(images["one"][0]))
    throughput = {}
    for b in job["batches"]:
        stats = measure(f"{label} batch {b}", lambda b=b: generate(b), max(1, job["runs"] // 2))
        throughput[str(b)] = {"median_s": stats["median_s"], "images_per_s": b / stats["median_s"]}
    return {
        "dtype": str(dtype).removeprefix("torch."), "attention_processor": attention, "compile_call_s": compile_s,
        "unet_step": {**unet_stats, "it_per_s": 1 / unet_stats["median_s"]},
        "txt2img": e2e, "throughput": throughput, "peak_vram_bytes": monitor.stop(),
        "torch_max_memory_allocated_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    }  # fmt: skip


def true_fp32(torch) -> None:
    """PyTorch's CUDA convolutions (and, if enabled, matmuls) run in TF32 by default: a reference runs in fp32."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def worker_optimize(job: dict) -> dict:
    """`sdrt optimize` of the fp32 export for the job's target, verified on its provider when present."""
    from sdrt.export.optimize import optimize

    start = time.perf_counter()
    entry = optimize(job["onnx_dir"], platform_of(job)["target"], progress=True)
    return {"optimize_s": time.perf_counter() - start, "graphs": entry}


def worker_graph_parity(job: dict) -> dict:
    """Relative error (max |sdrt - PyTorch| / max(1, max |PyTorch|)) of each sdrt graph against the diffusers fp32
    module on identical inputs: UNet at batch 2 (one guided step), VAE decoder and text encoder, at the job's size."""
    import torch
    from diffusers import StableDiffusionPipeline

    from sdrt.export import to_onnx
    from sdrt.export.optimize import check_feeds, relative_error, run_graph
    from sdrt.runtime.manifest import Manifest

    plat = platform_of(job)
    device = plat["torch_device"]
    true_fp32(torch)
    pipe = StableDiffusionPipeline.from_pretrained(job["diffusers_dir"], torch_dtype=torch.float32).to(device)
    modules = {"text_encoder": (pipe.text_encoder, to_onnx.text_encoder_forward),
               "unet": (pipe.unet, to_onnx.unet_forward), "vae_decoder": (pipe.vae, to_onnx.vae_decoder_forward)}
    latent = job["height"] // LATENT_DOWNSAMPLE
    errors = {}
    for label, folder, target in job["graph_sets"]:
        manifest = Manifest.load(folder)
        for name in PARITY_GRAPHS:
            module, forward = modules[name]
            feeds = check_feeds(manifest, name, batch=2 if name == "unet" else 1, latent=latent)
            order = [t["name"] for t in manifest.models[name]["inputs"]]
            with torch.no_grad():
                out = forward(module, *(torch.from_numpy(feeds[n]).to(device) for n in order))
            reference = [y.float().cpu().numpy() for y in (out if isinstance(out, tuple) else (out,))]
            path = manifest.graph_path(name, target)
            try:
                errors[f"{label}/{name}"] = relative_error(run_graph(path, feeds, plat["provider"]), reference)
            except Exception as e:  # a graph that does not run here is a result too
                errors[f"{label}/{name}"] = f"error: {str(e)[:200]}"
            log(f"graph parity {label}/{name}: {errors[f'{label}/{name}']}")
    return {"relative_error": errors, "latent": latent}
