"""GPU benchmark: sdrt (ONNX Runtime CUDA: the fp16 export, the fused fp16 graphs of `sdrt optimize`, those at a static
profile with CUDA graphs; TensorRT) against diffusers (PyTorch fp16 SDPA, torch.compile where it compiles in time) in
one run, on identical random weights; benchmarks/gpu_check.sh runs it on a fresh GPU machine.

Per runtime, in its own subprocess: UNet iterations/s (one guided step, batch 2), end-to-end txt2img latency, images/s
at each --batches size, peak VRAM (NVML, sampled every 5 ms, minus the idle baseline) over that run and, in a process
of its own, at batch 1 alone; engine build time; ONNX Runtime's Memcpy node count per graph; and the image's
difference from diffusers' **fp32** image for the same seed (on random weights diffusers fp16 and fp32 differ by
255/255 themselves, ../shared/GPU.md). A graph-parity stage runs each sdrt graph and PyTorch fp32 on identical inputs:
relative error per graph. --cpu-smoke runs every stage with the CPU provider and PyTorch on the CPU (tiny models: a
test of the driver, no figure). Writes results/<gpu>.json (+ .md, .png).
"""

import re
import threading
import time
from pathlib import Path

from sdrt.bench.common import (
    CFG_SCALE,
    LATENT_DOWNSAMPLE,
    NEGATIVE_PROMPT,
    PROMPT,
    RESULTS_DIR,
    SAMPLER,
    SCHEMA_VERSION,
    UNET_BATCH,
    WEIGHTS_SEED,
    base_job,
    gib,
    log,
    measure,
    now_iso,
    package_version,
    prepare_model,
    run_child,
    sdrt_version,
    unet_inputs,
    write_results,
)

# Dense fp16 tensor-core peak (TFLOP/s, no sparsity) from NVIDIA's datasheets, matched in the device name.
FP16_DENSE_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "T4": 65.0,
}
RUNTIMES = ("sdrt_cuda", "sdrt_cuda_fused", "sdrt_cuda_static", "diffusers", "diffusers_fp32", "diffusers_compile",
            "sdrt_tensorrt", "sdrt_tensorrt_low_vram")  # fmt: skip
# gpu_check.sh: what ONNX Runtime CUDA and PyTorch run there, the reference and the key comparison first (a stage cut
# off by the time budget loses what comes after it)
CHECK_RUNTIMES = ("diffusers_fp32", "diffusers", "sdrt_cuda_static", "sdrt_cuda_fused", "sdrt_cuda",
                  "diffusers_compile")  # fmt: skip
REFERENCE = "diffusers_fp32"  # the image every runtime is compared with
PARITY_GRAPHS = ("text_encoder", "unet", "vae_decoder")
COMPILE_TIMEOUT_S = 240  # diffusers + torch.compile: recorded only when it compiles and runs within this


def platform_of(job: dict) -> dict:
    """What the job runs on: ONNX Runtime backend and fused target, PyTorch device, the provider for raw graphs.
    A --cpu-smoke job runs the same stages on the CPU."""
    if job.get("cpu_smoke"):
        return {"backend": "cpu", "target": "cpu", "torch_device": "cpu", "provider": "CPUExecutionProvider"}
    return {"backend": "cuda", "target": "cuda", "torch_device": "cuda", "provider": "CUDAExecutionProvider"}


def gpu_device_name(cpu_smoke: bool = False) -> str:
    """The GPU's name from NVML (nvidia-ml-py), else PyTorch; the CPU's for a smoke run."""
    if cpu_smoke:
        from sdrt.bench.common import cpu_model

        return f"CPU smoke run ({cpu_model()})"
    try:
        import pynvml

        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # no NVML: ask PyTorch
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown GPU"


def fp16_peak_tflops(device_name: str) -> float | None:
    """The GPU's dense fp16 tensor rate, or None for a GPU not in the table."""
    for key, tflops in FP16_DENSE_TFLOPS.items():
        if key.lower() in device_name.lower():
            return tflops
    return None


def gpu_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'gpu-nvidia-h100-80gb-hbm3'."""
    return "gpu-" + (re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown")


def unet_utilisation(tflop_per_sample_step: float | None, size: int, step_s: float, device: str) -> dict:
    """Achieved UNet TFLOP/s for one guided step (UNET_BATCH samples) at SIZE pixels, and its share of the peak.

    The UNet's cost scales with the latent area: (SIZE / 512)^2 times the 512x512 figure.
    """
    if not tflop_per_sample_step or not step_s:
        return {"tflops": None, "fraction_of_fp16_peak": None}
    tflops = tflop_per_sample_step * (size / 512) ** 2 * UNET_BATCH / step_s
    peak = fp16_peak_tflops(device)
    return {"tflops": tflops, "fp16_peak_tflops": peak, "fraction_of_fp16_peak": tflops / peak if peak else None}


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
    return pipe.generate(
        PROMPT, negative_prompt=NEGATIVE_PROMPT, width=job["width"], height=job["height"], steps=job["steps"],
        cfg_scale=CFG_SCALE, sampler=SAMPLER, seed=job["seed"], batch_size=batch, progress=False,
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
    sample, timestep, context = unet_inputs(job)
    feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": context}
    unet = pipe.engines["unet"]
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
    """diffusers' StableDiffusionPipeline on the job's device with SDPA, in fp16 (job["fp32"]: float32, the parity
    reference); job["compile"]: torch.compile on the UNet. job["peak_only"]: one batch-1 image, for its peak VRAM."""
    import numpy as np
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    device = platform_of(job)["torch_device"]
    dtype = torch.float32 if job.get("fp32") or device == "cpu" else torch.float16
    if dtype == torch.float32:
        true_fp32(torch)
    monitor = vram_monitor(job)
    pipe = StableDiffusionPipeline.from_pretrained(
        job["diffusers_dir"], torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    attention = type(next(iter(pipe.unet.attn_processors.values()))).__name__
    compile_s = None
    if job.get("compile"):
        start = time.perf_counter()
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
        compile_s = time.perf_counter() - start  # plus the first call's compilation, inside the warm-up
    sample, timestep, context = (torch.from_numpy(x).to(device, dtype) for x in unet_inputs(job))

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def unet_call():
        with torch.inference_mode():
            pipe.unet(sample, timestep, context, return_dict=False)
        sync()

    def generate(batch):
        with torch.inference_mode():
            out = pipe(
                PROMPT, negative_prompt=NEGATIVE_PROMPT, width=job["width"], height=job["height"],
                num_inference_steps=job["steps"], guidance_scale=CFG_SCALE, num_images_per_prompt=batch,
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


def image_parity(out_dir: Path, name: str, reference: str = REFERENCE) -> dict | None:
    """NAME's image against REFERENCE's for the same seed: max and mean |difference| in /255, PSNR in dB."""
    import numpy as np

    a, b = Path(out_dir) / f"{name}_image.npy", Path(out_dir) / f"{reference}_image.npy"
    if not (a.is_file() and b.is_file()):
        return None
    diff = np.load(a).astype(np.float64) - np.load(b).astype(np.float64)
    mse = float(np.mean(diff**2))
    return {"reference": reference, "max_abs_255": int(np.abs(diff).max()), "mean_abs_255": float(np.abs(diff).mean()),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))}  # fmt: skip


def parity_cell(parity: dict) -> str:
    return f"{parity['max_abs_255']} / {parity['mean_abs_255']:.2f}, {parity['psnr_db']:.1f} dB"


def markdown_table(report: dict) -> str:
    """One row per metric, one column per runtime measured; then the per-graph errors against PyTorch fp32."""
    names = [n for n in RUNTIMES if n in report["runtimes"]]
    r = report["runtimes"]

    def cell(name, fn):
        try:
            return fn(r[name])
        except (KeyError, TypeError, ZeroDivisionError, ValueError):
            return "n/a"

    st = report["settings"]
    rows = [
        ("UNet it/s (batch 2, one guided step)", lambda m: f"{m['unet_step']['it_per_s']:.2f}"),
        ("UNet step (batch 2), median", lambda m: f"{1000 * m['unet_step']['median_s']:.1f} ms"),
        ("UNet TFLOP/s (share of fp16 peak)",
         lambda m: f"{m['unet_util']['tflops']:.0f} ({100 * m['unet_util']['fraction_of_fp16_peak']:.0f}%)"),
        (f"txt2img {st['width']}x{st['height']}, {st['steps']} steps (median)",
         lambda m: f"{m['txt2img']['median_s']:.3f} s"),
    ]  # fmt: skip
    rows += [(f"images/s at batch {b}", lambda m, b=b: f"{m['throughput'][str(b)]['images_per_s']:.2f}")
             for b in st["batches"]]  # fmt: skip
    rows += [
        ("peak VRAM, whole run (NVML, above idle)", lambda m: gib(m["peak_vram_bytes"])),
        ("peak VRAM, batch 1 alone (own process)", lambda m: gib(m["peak_vram_batch1_bytes"])),
        ("Memcpy nodes (text encoder / UNet / VAE decoder)",
         lambda m: " / ".join(str(m["memcpy_nodes"].get(k)) for k in PARITY_GRAPHS)),
        ("engine build", lambda m: ", ".join(f"{k}: {v:.0f} s" for k, v in m["engine_build_s"].items()) or "-"),
        (f"image vs {REFERENCE}: max / mean /255, PSNR", lambda m: parity_cell(m["parity"])),
        ("speed-up vs diffusers fp16 (txt2img)", lambda m: f"{m['speedup_vs_diffusers']:.2f}x"),
    ]  # fmt: skip
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(cell(n, fn) for n in names) + " |")
    for name, m in r.items():
        if "error" in m:
            lines.append(f"\n{name}: not measured ({m['error']})")
    errors = (report.get("graph_parity") or {}).get("relative_error", {})
    if errors:
        lines += ["", "| graph vs PyTorch fp32 (same inputs) | relative error |", "|---|---|"]
        lines += [f"| {k} | {v if isinstance(v, str) else f'{v:.2e}'} |" for k, v in errors.items()]
    return "\n".join(lines)


def run_gpu(args, case) -> int:
    """The GPU benchmark of CASE: fp32 export + `sdrt optimize` and an fp16 export, then each runtime in its own
    subprocess (and again at batch 1 alone for its peak VRAM), then per-graph parity against PyTorch fp32."""
    smoke = bool(getattr(args, "cpu_smoke", False))
    device = gpu_device_name(smoke)
    model_dir = args.workdir.resolve() / case.name
    job_dir, out_dir = model_dir / "jobs", model_dir / "outputs"
    for folder in (job_dir, out_dir):
        folder.mkdir(parents=True, exist_ok=True)
    wanted = args.runtimes.split(",") if args.runtimes else list(CHECK_RUNTIMES)
    if smoke:
        wanted = [n for n in wanted if n not in ("diffusers_compile", "sdrt_tensorrt", "sdrt_tensorrt_low_vram")]
    built, exported = prepare_model(args, case.configs(), model_dir, job_dir, precision="fp32")
    fp32_dir, fp16_dir = model_dir / "onnx", model_dir / "onnx-fp16"
    exports = {"fp32": exported}
    fp16_export = None
    if any(n in wanted for n in ("sdrt_cuda", "sdrt_tensorrt", "sdrt_tensorrt_low_vram")) and not smoke:
        # the fp16 export runs beside `sdrt optimize` (both mostly single-threaded: a GPU machine has the cores)
        def export_fp16():
            exports["fp16"] = prepare_model(args, case.configs(), model_dir, job_dir, precision="fp16")[1]

        fp16_export = threading.Thread(target=export_fp16)
        fp16_export.start()
    batches = [int(b) for b in args.batches.split(",")]
    job = {**base_job(args, case.configs(), model_dir, fp32_dir, out_dir), "batches": batches, "cpu_smoke": smoke}
    plat = platform_of(job)
    optimized = None
    if any(n in ("sdrt_cuda_fused", "sdrt_cuda_static") for n in wanted):
        try:  # no stage limit: the full SD 1.5 UNet's fusion took 225 s on a 2-core CPU (the caller's budget bounds it)
            result, wall, peak = run_child("optimize", job, job_dir, fatal=False)
            optimized = {**result, "wall_s": wall, "peak_rss_bytes": peak}
            log(f"optimize ({plat['target']}) in {wall:.1f} s")
        except RuntimeError as e:
            optimized = {"error": str(e)}
    if fp16_export is not None:
        fp16_export.join()
    plain_dir = fp32_dir if smoke else fp16_dir  # the smoke run's "unfused" graphs: the fp32 export on the CPU
    stages = {
        "diffusers": ("diffusers_gpu", {}),
        "diffusers_fp32": ("diffusers_gpu", {"fp32": True}),
        "diffusers_compile": ("diffusers_gpu", {"compile": True}),
        "sdrt_cuda": ("sdrt_gpu", {"backend": plat["backend"], "onnx_dir": str(plain_dir)}),
        "sdrt_cuda_fused": ("sdrt_gpu", {"backend": plat["backend"], "fused": True}),
        "sdrt_cuda_static": ("sdrt_gpu", {"backend": plat["backend"], "fused": True, "static": True}),
        "sdrt_tensorrt": ("sdrt_gpu", {"backend": "tensorrt", "onnx_dir": str(fp16_dir)}),
        "sdrt_tensorrt_low_vram": ("sdrt_gpu", {"backend": "tensorrt", "onnx_dir": str(fp16_dir),
                                                "vram_budget": args.vram_budget}),
    }  # fmt: skip
    runtimes = {}
    order = [REFERENCE] + [n for n in wanted if n != REFERENCE] if REFERENCE in wanted else wanted
    for name in order:
        worker, extra = stages[name]
        timeout = COMPILE_TIMEOUT_S if name == "diffusers_compile" else args.stage_timeout
        try:
            result, wall, _ = run_child(worker, {**job, **extra, "name": name}, job_dir, fatal=False, timeout=timeout,
                                        label=name)  # fmt: skip
        except RuntimeError as e:  # torch.compile or a backend may be missing or too slow: recorded, not fatal
            runtimes[name] = {"error": str(e)}
            continue
        result["unet_util"] = unet_utilisation(
            case.unet_tflop_per_sample_step, args.size, result["unet_step"]["median_s"], device
        )
        runtimes[name] = {**result, "process_wall_s": wall}
        write_report(args, case, device, smoke, built, exports, optimized, None, runtimes, out_dir)
        if args.peak_batch1 and name not in ("diffusers_compile", REFERENCE):
            try:
                peak1, _, _ = run_child(worker, {**job, **extra, "name": name, "peak_only": True}, job_dir,
                                        fatal=False, timeout=args.stage_timeout, label=f"{name}-peak1")  # fmt: skip
                runtimes[name]["peak_vram_batch1_bytes"] = peak1["peak_vram_bytes"]
            except RuntimeError as e:
                runtimes[name]["peak_vram_batch1_bytes"] = None
                log(f"{name}: batch-1 peak not measured ({e})")
    parity_graphs = None
    if args.graph_parity:
        sets = [("fp32 export", str(fp32_dir), None)]
        if optimized and "graphs" in optimized:
            sets.append((f"fused {plat['target']}", str(fp32_dir), plat["target"]))
        if "fp16" in exports:
            sets.append(("fp16 export", str(fp16_dir), None))
        try:
            parity_graphs, _, _ = run_child("graph_parity_gpu", {**job, "graph_sets": sets}, job_dir, fatal=False,
                                            timeout=args.stage_timeout)  # fmt: skip
        except RuntimeError as e:
            parity_graphs = {"error": str(e)}
    report = write_report(args, case, device, smoke, built, exports, optimized, parity_graphs, runtimes, out_dir)
    print(report["table_markdown"])
    return 0


def write_report(args, case, device, smoke, built, exports, optimized, parity_graphs, runtimes, out_dir) -> dict:
    """The report of what has run so far, written (JSON, markdown, chart) after every stage: a run cut off by its
    time budget keeps what it measured."""
    base = runtimes.get("diffusers", {}).get("txt2img", {}).get("median_s")
    for name, m in runtimes.items():
        if "txt2img" in m:
            m["speedup_vs_diffusers"] = base / m["txt2img"]["median_s"] if base else None
            m["parity"] = image_parity(out_dir, name)
    report = {
        "benchmark": "gpu_e2e",
        "schema_version": SCHEMA_VERSION,
        "date": now_iso(),
        "smoke": case.smoke or smoke,
        "device": {
            "name": device,
            "fp16_dense_tflops": fp16_peak_tflops(device),
            "versions": {
                **{n: package_version(n) for n in ("tensorrt", "onnxruntime-gpu", "onnxruntime", "torch", "diffusers",
                                                   "cuda-python")},
                "sdrt": sdrt_version(),
            },
        },  # fmt: skip
        "settings": {
            "model": case.description, "width": args.size, "height": args.size, "steps": args.steps,
            "cfg_scale": CFG_SCALE, "sampler": SAMPLER, "seed": args.seed, "runs": args.runs,
            "batches": [int(b) for b in args.batches.split(",")],
            "precision": "fp16", "parity_reference": REFERENCE,
        },  # fmt: skip
        "model": {"case": case.name, "weights_seed": WEIGHTS_SEED, "parameters": built["parameters"]},
        "export": exports,
        "optimize": optimized,
        "graph_parity": parity_graphs,
        "runtimes": runtimes,
    }
    table = markdown_table(report)
    report["table_markdown"] = table
    output = args.output or RESULTS_DIR / f"{'smoke-' if report['smoke'] else ''}{gpu_slug(device)}.json"
    bars = [(n, m["txt2img"]["median_s"], "s") for n, m in runtimes.items() if "txt2img" in m]
    title = f"{case.description}, {args.size}x{args.size}, {args.steps} steps, txt2img latency, {device}"
    write_results(report, output, table, title, bars)
    return report
