"""GPU benchmark: sdrt (TensorRT, ONNX Runtime CUDA) against diffusers (PyTorch fp16, SDPA, torch.compile where it
works) in one run, on identical random weights. WRITTEN, NOT YET RUN: no GPU was available where it was written.

Per runtime, in its own subprocess: UNet iterations/s (one guided step, batch 2), end-to-end txt2img latency, images/s
at each --batches size, peak VRAM (NVML, sampled every 5 ms, minus the idle baseline), engine build time, and the
image's max pixel difference against diffusers' fp16 image for the same seed. Writes results/<gpu>.json (+ .md, .png).
"""

import re
import threading
import time
from pathlib import Path

from sdrt.bench.common import (
    CFG_SCALE,
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
RUNTIMES = ("sdrt_tensorrt", "sdrt_tensorrt_low_vram", "sdrt_cuda", "diffusers", "diffusers_compile")


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


def _sdrt_generate(pipe, job, batch):
    return pipe.generate(
        PROMPT, negative_prompt=NEGATIVE_PROMPT, width=job["width"], height=job["height"], steps=job["steps"],
        cfg_scale=CFG_SCALE, sampler=SAMPLER, seed=job["seed"], batch_size=batch, progress=False,
    )  # fmt: skip


def worker_sdrt_gpu(job: dict) -> dict:
    """sdrt on "tensorrt" (engines built here, timed) or "cuda" (ONNX Runtime CUDA, fp16 export)."""
    import numpy as np

    from sdrt.bench.common import block_torch

    block_torch()
    from sdrt.engines.plan import ShapeRanges
    from sdrt.runtime.pipeline import Pipeline

    backend, size, batches = job["backend"], job["width"], job["batches"]
    built = {}
    if backend == "tensorrt":
        from sdrt.export.build_trt import build

        for label, ranges in (
            ("static batch 1", ShapeRanges.static(1, size, size)),
            (f"dynamic batch 1-{max(batches)}", ShapeRanges((1, 1, max(batches)), (size,) * 3, (size,) * 3, (1, 1, 1))),
        ):
            start = time.perf_counter()
            build(job["onnx_dir"], ranges, progress=False, weight_streaming=bool(job.get("vram_budget")))
            built[label] = time.perf_counter() - start
            log(f"sdrt {backend}: built {label} engines in {built[label]:.1f} s")
    monitor = VramMonitor()
    pipe = Pipeline.load(job["onnx_dir"], backend=backend, vram_budget=job.get("vram_budget"))
    sample, timestep, context = unet_inputs(job)
    feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": context}
    unet = pipe.engines["unet"]
    unet_stats = measure(f"sdrt {backend} UNet", lambda: unet.run(feeds), job["runs"] * 5)
    images = {}
    e2e = measure(f"sdrt {backend} txt2img", lambda: images.update(one=_sdrt_generate(pipe, job, 1)), job["runs"])
    np.save(Path(job["out_dir"]) / f"{job['name']}_image.npy", np.asarray(images["one"][0]))
    throughput = {}
    for b in batches:
        stats = measure(f"sdrt {backend} batch {b}", lambda b=b: _sdrt_generate(pipe, job, b), max(1, job["runs"] // 2))
        throughput[str(b)] = {"median_s": stats["median_s"], "images_per_s": b / stats["median_s"]}
    return {
        "backend": backend,
        "engine_build_s": built,
        "unet_step": {**unet_stats, "it_per_s": 1 / unet_stats["median_s"]},
        "txt2img": e2e,
        "throughput": throughput,
        "peak_vram_bytes": monitor.stop(),
    }


def worker_diffusers_gpu(job: dict) -> dict:
    """diffusers' StableDiffusionPipeline in fp16 on CUDA with SDPA; job["compile"]: torch.compile on the UNet."""
    import numpy as np
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    monitor = VramMonitor()
    pipe = StableDiffusionPipeline.from_pretrained(
        job["diffusers_dir"], torch_dtype=torch.float16, safety_checker=None, requires_safety_checker=False
    ).to("cuda")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    compile_s = None
    if job.get("compile"):
        start = time.perf_counter()
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
        compile_s = time.perf_counter() - start  # plus the first call's compilation, inside the warm-up
    sample, timestep, context = (torch.from_numpy(x).to("cuda", torch.float16) for x in unet_inputs(job))

    def unet_call():
        with torch.inference_mode():
            pipe.unet(sample, timestep, context, return_dict=False)
        torch.cuda.synchronize()

    def generate(batch):
        with torch.inference_mode():
            out = pipe(
                PROMPT, negative_prompt=NEGATIVE_PROMPT, width=job["width"], height=job["height"],
                num_inference_steps=job["steps"], guidance_scale=CFG_SCALE, num_images_per_prompt=batch,
                generator=torch.Generator("cpu").manual_seed(job["seed"]),
            )  # fmt: skip
        torch.cuda.synchronize()
        return out.images

    label = "diffusers compile" if job.get("compile") else "diffusers"
    unet_stats = measure(f"{label} UNet", unet_call, job["runs"] * 5)
    images = {}
    e2e = measure(f"{label} txt2img", lambda: images.update(one=generate(1)), job["runs"])
    np.save(Path(job["out_dir"]) / f"{label.replace(' ', '_')}_image.npy", np.asarray(images["one"][0]))
    throughput = {}
    for b in job["batches"]:
        stats = measure(f"{label} batch {b}", lambda b=b: generate(b), max(1, job["runs"] // 2))
        throughput[str(b)] = {"median_s": stats["median_s"], "images_per_s": b / stats["median_s"]}
    return {
        "attention_processor": type(next(iter(pipe.unet.attn_processors.values()))).__name__ if not compile_s else "",
        "compile_call_s": compile_s,
        "unet_step": {**unet_stats, "it_per_s": 1 / unet_stats["median_s"]},
        "txt2img": e2e,
        "throughput": throughput,
        "peak_vram_bytes": monitor.stop(),
        "torch_max_memory_allocated_bytes": torch.cuda.max_memory_allocated(),
    }


def image_parity(out_dir: Path, name: str) -> int | None:
    """Max |sdrt image - diffusers fp16 image| in /255 for the same seed (None if either is missing)."""
    import numpy as np

    a, b = Path(out_dir) / f"{name}_image.npy", Path(out_dir) / "diffusers_image.npy"
    if not (a.is_file() and b.is_file()):
        return None
    return int(np.abs(np.load(a).astype(np.int16) - np.load(b).astype(np.int16)).max())


def markdown_table(report: dict) -> str:
    """One row per metric, one column per runtime measured."""
    names = [n for n in RUNTIMES if n in report["runtimes"]]
    r = report["runtimes"]

    def cell(name, fn):
        try:
            return fn(r[name])
        except (KeyError, TypeError, ZeroDivisionError):
            return "n/a"

    st = report["settings"]
    rows = [
        ("UNet it/s (batch 2, one guided step)", lambda m: f"{m['unet_step']['it_per_s']:.2f}"),
        (
            "UNet TFLOP/s (share of fp16 peak)",
            lambda m: f"{m['unet_util']['tflops']:.0f} ({100 * m['unet_util']['fraction_of_fp16_peak']:.0f}%)",
        ),  # fmt: skip
        (
            f"txt2img {st['width']}x{st['height']}, {st['steps']} steps (median)",
            lambda m: f"{m['txt2img']['median_s']:.3f} s",
        ),  # fmt: skip
    ]
    rows += [(f"images/s at batch {b}", lambda m, b=b: f"{m['throughput'][str(b)]['images_per_s']:.2f}")
             for b in st["batches"]]  # fmt: skip
    rows += [
        ("peak VRAM (NVML, above idle)", lambda m: gib(m["peak_vram_bytes"])),
        ("engine build", lambda m: ", ".join(f"{k}: {v:.0f} s" for k, v in m["engine_build_s"].items()) or "-"),
        ("max pixel diff vs diffusers fp16", lambda m: f"{m['parity_max_abs_255']}/255"),
        ("speed-up vs diffusers (txt2img)", lambda m: f"{m['speedup_vs_diffusers']:.2f}x"),
    ]
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(cell(n, fn) for n in names) + " |")
    return "\n".join(lines)


def run_gpu(args, case) -> int:
    """The GPU benchmark of CASE: fp16 export, then each runtime in its own subprocess."""
    from sdrt.engines.tensorrt import device_name

    device = device_name()
    model_dir = args.workdir.resolve() / case.name
    job_dir, out_dir = model_dir / "jobs", model_dir / "outputs"
    for folder in (job_dir, out_dir):
        folder.mkdir(parents=True, exist_ok=True)
    built, exported = prepare_model(args, case.configs(), model_dir, job_dir, precision="fp16")
    batches = [int(b) for b in args.batches.split(",")]
    job = {**base_job(args, case.configs(), model_dir, model_dir / "onnx-fp16", out_dir), "batches": batches}
    stages = {
        "diffusers": ("diffusers_gpu", {}),
        "diffusers_compile": ("diffusers_gpu", {"compile": True}),
        "sdrt_cuda": ("sdrt_gpu", {"backend": "cuda"}),
        "sdrt_tensorrt": ("sdrt_gpu", {"backend": "tensorrt"}),
        "sdrt_tensorrt_low_vram": ("sdrt_gpu", {"backend": "tensorrt", "vram_budget": args.vram_budget}),
    }
    wanted = args.runtimes.split(",") if args.runtimes else list(stages)
    runtimes = {}
    for name in wanted:
        worker, extra = stages[name]
        try:
            result, wall, _ = run_child(worker, {**job, **extra, "name": name}, job_dir, fatal=False)
        except RuntimeError as e:  # torch.compile or a backend may be missing on this machine: recorded, not fatal
            runtimes[name] = {"error": str(e)}
            continue
        result["unet_util"] = unet_utilisation(
            case.unet_tflop_per_sample_step, args.size, result["unet_step"]["median_s"], device
        )
        runtimes[name] = {**result, "process_wall_s": wall}
    base = runtimes.get("diffusers", {}).get("txt2img", {}).get("median_s")
    for name, m in runtimes.items():
        if "txt2img" in m:
            m["speedup_vs_diffusers"] = base / m["txt2img"]["median_s"] if base else None
            m["parity_max_abs_255"] = image_parity(out_dir, name) if name != "diffusers" else 0
    report = {
        "benchmark": "gpu_e2e",
        "schema_version": SCHEMA_VERSION,
        "date": now_iso(),
        "smoke": case.smoke,
        "device": {
            "name": device,
            "fp16_dense_tflops": fp16_peak_tflops(device),
            "versions": {
                n: package_version(n)
                for n in ("sdrt", "tensorrt", "onnxruntime-gpu", "torch", "diffusers", "cuda-python")
            },
        },  # fmt: skip
        "settings": {
            "model": case.description,
            "width": args.size,
            "height": args.size,
            "steps": args.steps,
            "cfg_scale": CFG_SCALE,
            "sampler": SAMPLER,
            "seed": args.seed,
            "runs": args.runs,
            "batches": batches,
            "precision": "fp16",
        },  # fmt: skip
        "model": {"case": case.name, "weights_seed": WEIGHTS_SEED, "parameters": built["parameters"]},
        "export": exported,
        "runtimes": runtimes,
    }
    table = markdown_table(report)
    report["table_markdown"] = table
    output = args.output or RESULTS_DIR / f"{'smoke-' if case.smoke else ''}{gpu_slug(device)}.json"
    bars = [(n, m["txt2img"]["median_s"], "s") for n, m in runtimes.items() if "txt2img" in m]
    title = f"{case.description}, {args.size}x{args.size}, {args.steps} steps, txt2img latency, {device}"
    write_results(report, output, table, title, bars)
    print(table)
    return 0
