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
from pathlib import Path

from sdrt.bench import flow_arch
from sdrt.bench.common import (
    CFG_SCALE,
    RESULTS_DIR,
    SAMPLER,
    SCHEMA_VERSION,
    UNET_BATCH,
    WEIGHTS_SEED,
    base_job,
    gib,
    log,
    now_iso,
    run_child,
    write_results,
)
from sdrt.bench.gpu_workers import PARITY_GRAPHS, platform_of
from sdrt.bench.machine import package_version, sdrt_version
from sdrt.bench.random_model import prepare_model

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
COMPILE_TIMEOUT_S = 240  # diffusers + torch.compile: recorded only when it compiles and runs within this


def gpu_device_name(cpu_smoke: bool = False) -> str:
    """The GPU's name from NVML (nvidia-ml-py), else PyTorch; the CPU's for a smoke run."""
    if cpu_smoke:
        from sdrt.bench.machine import cpu_model

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


def stages_of(args, plat: dict, plain_dir: Path, fp16_dir: Path) -> dict:
    """Runtime name -> (its worker stage, the job fields it adds)."""
    return {
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


def graph_parity(args, job: dict, job_dir: Path, optimized, exports: dict, fp32_dir: Path, fp16_dir: Path):
    """Each graph set (fp32 export, fused graphs, fp16 export) against PyTorch fp32 on identical inputs (None when
    --no-graph-parity; {"error": ...} when the stage failed)."""
    if not args.graph_parity or flow_arch.FLOW_KINDS.get(job.get("pipeline")):  # the UNet families' graphs only
        return None
    target = platform_of(job)["target"]
    sets = [("fp32 export", str(fp32_dir), None)]
    if optimized and "graphs" in optimized:
        sets.append((f"fused {target}", str(fp32_dir), target))
    if "fp16" in exports:
        sets.append(("fp16 export", str(fp16_dir), None))
    try:
        parity, _, _ = run_child("graph_parity_gpu", {**job, "graph_sets": sets}, job_dir, fatal=False,
                                 timeout=args.stage_timeout)  # fmt: skip
    except RuntimeError as e:
        parity = {"error": str(e)}
    return parity


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
    if flow_arch.FLOW_KINDS.get(case.pipeline):  # `sdrt optimize` fuses UNets: a transformer runs its plain graphs
        wanted = [n for n in wanted if n not in ("sdrt_cuda_fused", "sdrt_cuda_static")]
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
    stages = stages_of(args, plat, plain_dir, fp16_dir)
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
    parity_graphs = graph_parity(args, job, job_dir, optimized, exports, fp32_dir, fp16_dir)
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
