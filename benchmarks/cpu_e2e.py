#!/usr/bin/env python
"""CPU benchmark: sdrt (ONNX Runtime fp32) against diffusers (PyTorch fp32), side by side, on identical weights.

Builds the full-size SD 1.5 architecture with random weights (speed and memory do not depend on the weights'
values), saves it as a diffusers folder, exports it with `sdrt.export.export`, then measures each runtime in its
own subprocess (so each one's peak RSS is its own): load time, one batch-2 UNet call, txt2img end to end, and
peak memory. Prints a markdown table and writes benchmarks/results/<machine>.json. See benchmarks/README.md.

    .venv/bin/python benchmarks/cpu_e2e.py             # full size: SD 1.5, 256x256, 10 steps, median of 3
    .venv/bin/python benchmarks/cpu_e2e.py --small     # tiny random models: a smoke test of this script
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
SCHEMA_VERSION = 1

PROMPT = "a photo of a grey squirrel"  # words the tiny CLIP vocabulary of tests/tiny_sd.py has merges for
NEGATIVE_PROMPT = "blue sky"
CFG_SCALE = 7.5  # > 1: classifier-free guidance, so the UNet runs on batch 2
SAMPLER = "Euler"  # diffusers: EulerDiscreteScheduler.from_config(pipe.scheduler.config)
UNET_BATCH = 2  # one guided step: conditional + unconditional
UNET_TIMESTEP = 500.0
WEIGHTS_SEED = 0
BUILD_VERSION = 2  # bump when the build changes: folders built by an older version are built again
LATENT_DOWNSAMPLE = 8  # VAE with 4 blocks: 3 downsamplings
BUSY_LOAD = 0.5  # 1-minute load average above which the run warns that timings are disturbed

# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json): 859.5 M parameters.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# CLIP ViT-L/14's text tower. The tokenizer is the tiny test vocabulary: its ids only index the embedding.
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

# --small: the same code path on models a few MB in size.
SMALL_UNET = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
SMALL_VAE = dict(SD15_VAE, block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=256)
SMALL_TEXT = dict(
    SD15_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64
)

# Wall-clock start of the whole benchmark; the subprocesses inherit it, so all progress lines share one clock.
_T0 = float(os.environ.setdefault("CPU_E2E_T0", str(time.time())))


def log(message: str) -> None:
    """Progress line on stderr: seconds since the benchmark started, then MESSAGE."""
    print(f"[cpu_e2e {time.time() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def gib(n_bytes) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    """The SIMD extensions that decide fp32 conv/matmul speed, as /proc/cpuinfo lists them."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_fp16")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def physical_cores() -> int:
    """The thread count sdrt's ONNX Runtime engine uses; PyTorch gets the same."""
    from sdrt.engines.onnxruntime import physical_cores as sdrt_physical_cores

    return sdrt_physical_cores()


def machine_slug(model: str, cores: int) -> str:
    """'Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz', 2 -> 'cpu-intel-xeon-platinum-8375c-2c'."""
    name = model.lower()
    name = re.sub(r"\((r|tm)\)", " ", name)
    name = re.sub(r"@.*$", " ", name)
    name = re.sub(r"\b\d+-core\b|\bprocessor\b|\bcpu\b|\bwith\b.*$", " ", name)
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"
    return f"cpu-{name}-{cores}c"


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe_machine() -> dict:
    import psutil

    model = cpu_model()
    cores = physical_cores()
    return {
        "slug": machine_slug(model, cores),
        "cpu_model": model,
        "cpu_flags": cpu_flags(),
        "physical_cores": cores,
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: package_version(name)
            for name in ("sdrt", "numpy", "onnxruntime", "torch", "diffusers", "transformers", "onnx")
        },
    }


# ----------------------------------------------------------------------------------------------- subprocesses


def run_child(stage: str, job: dict, job_dir: Path) -> tuple[dict, float, int]:
    """Run this script as `--worker STAGE` in a subprocess: (its result, wall seconds, its peak RSS in bytes).

    The peak RSS comes from wait4's rusage of that one child, so each runtime's figure is its own.
    """
    job_file = job_dir / f"{stage}.job.json"
    result_file = job_dir / f"{stage}.result.json"
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps(dict(job, result_file=str(result_file)), indent=2))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", stage, str(job_file)])
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    peak_rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB
    if proc.returncode != 0 or not result_file.is_file():
        sys.exit(f"cpu_e2e: the {stage} subprocess failed (exit status {proc.returncode}); see its errors above")
    return json.loads(result_file.read_text()), wall, peak_rss


def rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def unet_inputs(job: dict):
    """The same UNet feeds for both runtimes: (B, C, h, w), (B,), (B, L, D) float32, drawn by numpy."""
    import numpy as np

    rng = np.random.default_rng(job["seed"])
    h = job["height"] // LATENT_DOWNSAMPLE
    w = job["width"] // LATENT_DOWNSAMPLE
    sample = rng.standard_normal((UNET_BATCH, job["latent_channels"], h, w), dtype=np.float32)
    timestep = np.full((UNET_BATCH,), UNET_TIMESTEP, dtype=np.float32)
    context = rng.standard_normal((UNET_BATCH, job["text_max_length"], job["context_dim"]), dtype=np.float32)
    return sample, timestep, context


def measure(label: str, fn, runs: int) -> dict:
    """One warm-up call, then RUNS timed calls; returns warm-up, every run and the median, in seconds."""
    warmup = timed(fn)
    log(f"  {label}: warm-up {warmup:.2f} s")
    times = []
    for i in range(runs):
        times.append(timed(fn))
        log(f"  {label}: run {i + 1}/{runs} {times[-1]:.2f} s")
    return {"warmup_s": warmup, "runs_s": times, "median_s": statistics.median(times), "min_s": min(times)}


# ----------------------------------------------------------------------------------------------- workers


def worker_build(job: dict) -> dict:
    """Random-weight SD pipeline of the job's configs -> a diffusers folder (written whole, then renamed)."""
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tiny_sd import SD15_SCHEDULER, assemble_pipeline, write_tiny_clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(job["diffusers_dir"])
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    write_tiny_clip_tokenizer(staging / "tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(staging / "tokenizer_src")
    torch.manual_seed(job["weights_seed"])
    log("build: UNet")
    unet = UNet2DConditionModel(**job["unet_config"])
    log("build: VAE")
    vae = AutoencoderKL(**job["vae_config"])
    log("build: text encoder")
    text_config = dict(job["text_config"])
    text_config["vocab_size"] = text_config["vocab_size"] or len(tokenizer)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **text_config,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    params = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
    }
    for name, count in params.items():
        log(f"build: {name} has {count / 1e6:.1f} M parameters")
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer, SD15_SCHEDULER)
    log(f"build: saving to {out}")
    pipe.save_pretrained(staging)
    # The scheduler config exactly as SD 1.5 publishes it: keys it leaves out (timestep_spacing) take each
    # diffusers scheduler class's own default when the pipeline swaps in Euler, as with the real model.
    (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER, indent=2))
    shutil.rmtree(staging / "tokenizer_src")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return {"parameters": params}


def worker_export(job: dict) -> dict:
    from sdrt.export import export

    start = time.perf_counter()
    export(job["diffusers_dir"], job["onnx_dir"], precision="fp32", overwrite=True, progress=True)
    return {"export_call_s": time.perf_counter() - start}


def worker_sdrt(job: dict) -> dict:
    """sdrt in a process where torch, diffusers and transformers cannot be imported: its memory is its own."""
    for name in ("torch", "diffusers", "transformers"):
        sys.modules[name] = None  # `import torch` now raises ImportError
    start = time.perf_counter()
    import numpy as np

    from sdrt.runtime.pipeline import Pipeline

    import_s = time.perf_counter() - start
    log("sdrt: loading the ONNX models")
    start = time.perf_counter()
    pipe = Pipeline.load(job["onnx_dir"], backend="cpu")
    load_s = time.perf_counter() - start
    log(f"sdrt: loaded in {load_s:.1f} s")
    rss_after_load = rss_now()
    unet = pipe.engines["unet"]
    sample, timestep, context = unet_inputs(job)
    feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": context}
    outputs = {}

    def unet_call():
        outputs["unet"] = unet.run(feeds)["out_sample"]  # (B, C, h, w) float32

    log(f"sdrt: UNet, batch {UNET_BATCH}, {job['width']}x{job['height']}")
    unet_stats = measure("sdrt UNet", unet_call, job["runs"])
    np.save(Path(job["out_dir"]) / "sdrt_unet.npy", outputs["unet"])

    images = []

    def txt2img():
        out = pipe.generate(
            PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            width=job["width"],
            height=job["height"],
            steps=job["steps"],
            cfg_scale=CFG_SCALE,
            sampler=SAMPLER,
            scheduler="automatic",
            seed=job["seed"],
            progress=False,
        )
        images.append(np.asarray(out[0]))  # (H, W, 3) uint8

    log(f"sdrt: txt2img {job['width']}x{job['height']}, {job['steps']} steps")
    e2e_stats = measure("sdrt txt2img", txt2img, job["runs"])
    np.save(Path(job["out_dir"]) / "sdrt_image.npy", images[-1])
    return {
        "import_s": import_s,
        "load_s": load_s,
        "rss_after_load_bytes": rss_after_load,
        "threads": unet.threads,
        "unet_step": unet_stats,
        "txt2img": e2e_stats,
        "images_repeatable": all(np.array_equal(im, images[0]) for im in images),
    }


def worker_diffusers(job: dict) -> dict:
    """diffusers' StableDiffusionPipeline, fp32 on the CPU, torch threads = physical cores."""
    start = time.perf_counter()
    import numpy as np
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    import_s = time.perf_counter() - start
    import diffusers.utils.logging
    import transformers.utils.logging

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch_dtype -> dtype renames, across versions
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    threads = physical_cores()
    torch.set_num_threads(threads)
    log("diffusers: loading the pipeline")
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        job["diffusers_dir"], torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    log(f"diffusers: loaded in {load_s:.1f} s")
    rss_after_load = rss_now()
    sample, timestep, context = (torch.from_numpy(x) for x in unet_inputs(job))
    outputs = {}

    def unet_call():
        with torch.inference_mode():
            outputs["unet"] = pipe.unet(sample, timestep, context, return_dict=False)[0]

    log(f"diffusers: UNet, batch {UNET_BATCH}, {job['width']}x{job['height']}")
    unet_stats = measure("diffusers UNet", unet_call, job["runs"])
    np.save(Path(job["out_dir"]) / "diffusers_unet.npy", outputs["unet"].numpy())

    images = []

    def txt2img():
        with torch.inference_mode():
            out = pipe(
                PROMPT,
                negative_prompt=NEGATIVE_PROMPT,
                width=job["width"],
                height=job["height"],
                num_inference_steps=job["steps"],
                guidance_scale=CFG_SCALE,
                generator=torch.Generator("cpu").manual_seed(job["seed"]),
                output_type="pil",
            )
        images.append(np.asarray(out.images[0]))  # (H, W, 3) uint8

    log(f"diffusers: txt2img {job['width']}x{job['height']}, {job['steps']} steps")
    e2e_stats = measure("diffusers txt2img", txt2img, job["runs"])
    np.save(Path(job["out_dir"]) / "diffusers_image.npy", images[-1])
    return {
        "import_s": import_s,
        "load_s": load_s,
        "rss_after_load_bytes": rss_after_load,
        "threads": torch.get_num_threads(),
        "attention_processor": type(next(iter(pipe.unet.attn_processors.values()))).__name__,
        "unet_step": unet_stats,
        "txt2img": e2e_stats,
        "images_repeatable": all(np.array_equal(im, images[0]) for im in images),
    }


WORKERS = {"build": worker_build, "export": worker_export, "sdrt": worker_sdrt, "diffusers": worker_diffusers}


def run_worker(stage: str, job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    result = WORKERS[stage](job)
    Path(job["result_file"]).write_text(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------------------------- stages


def onnx_is_current(onnx_dir: Path) -> bool:
    """True if ONNX_DIR holds an export this sdrt can load (its manifest reads and validates)."""
    from sdrt.runtime.errors import ModelError
    from sdrt.runtime.manifest import Manifest

    try:
        Manifest.load(onnx_dir)
    except ModelError:
        return False
    return True


def prepare_model(args, configs: dict, model_dir: Path, job_dir: Path) -> tuple[dict, dict]:
    """Build and export unless already done (or --rebuild): (build info, export measurements)."""
    diffusers_dir, onnx_dir = model_dir / "diffusers", model_dir / "onnx"
    build_file, export_file = model_dir / "build.json", model_dir / "export.json"
    stamp = {"build_version": BUILD_VERSION, "weights_seed": WEIGHTS_SEED, **configs}
    built = None
    if not args.rebuild and (diffusers_dir / "model_index.json").is_file() and build_file.is_file():
        built = json.loads(build_file.read_text())
        if {k: built.get(k) for k in stamp} != json.loads(json.dumps(stamp)):
            built = None
    rebuilt = built is None
    if rebuilt:
        log(f"building the random-weight model in {diffusers_dir}")
        job = {"diffusers_dir": str(diffusers_dir), "weights_seed": WEIGHTS_SEED, **configs}
        result, wall, peak = run_child("build", job, job_dir)
        built = {**stamp, **result, "build_wall_s": wall, "build_peak_rss_bytes": peak}
        build_file.write_text(json.dumps(built, indent=2))
        log(f"built in {wall:.1f} s, peak RSS {gib(peak)}")
    else:
        log(f"reusing {diffusers_dir} (--rebuild to make it again)")
    unet_params = built["parameters"]["unet"]
    log(f"UNet parameters: {unet_params / 1e6:.1f} M")

    if rebuilt or args.rebuild or not export_file.is_file() or not onnx_is_current(onnx_dir):
        log(f"exporting with sdrt to {onnx_dir}")
        job = {"diffusers_dir": str(diffusers_dir), "onnx_dir": str(onnx_dir)}
        result, wall, peak = run_child("export", job, job_dir)
        exported = {
            "wall_s": wall,
            **result,
            "peak_rss_bytes": peak,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        export_file.write_text(json.dumps(exported, indent=2))
        log(f"exported in {wall:.1f} s, peak RSS {gib(peak)}")
        exported["measured_in_this_run"] = True
    else:
        exported = dict(json.loads(export_file.read_text()), measured_in_this_run=False)
        log(f"reusing {onnx_dir}; its export was measured on {exported['date']} (--rebuild to export again)")
    return built, exported


def compare_outputs(out_dir: Path) -> dict:
    import numpy as np

    unet_a, unet_b = np.load(out_dir / "sdrt_unet.npy"), np.load(out_dir / "diffusers_unet.npy")
    img_a = np.load(out_dir / "sdrt_image.npy").astype(np.int16)
    img_b = np.load(out_dir / "diffusers_image.npy").astype(np.int16)
    if img_a.shape != img_b.shape:
        return {"error": f"image shapes differ: sdrt {img_a.shape}, diffusers {img_b.shape}"}
    return {
        "unet_max_abs_diff": float(np.abs(unet_a.astype(np.float64) - unet_b).max()),
        "unet_max_abs_output": float(np.abs(unet_b).max()),
        "image_max_abs_diff": int(np.abs(img_a - img_b).max()),  # /255
        "image_mean_abs_diff": float(np.abs(img_a - img_b).mean()),
    }


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def markdown_table(report: dict) -> str:
    s, d, r = report["sdrt"], report["diffusers"], report["ratios"]
    st = report["settings"]
    size = f"{st['width']}x{st['height']}"
    rows = [
        ("load time", f"{s['load_s']:.2f} s", f"{d['load_s']:.2f} s", r["load_s"]),
        ("import time", f"{s['import_s']:.2f} s", f"{d['import_s']:.2f} s", r["import_s"]),
        (
            f"UNet call, batch {UNET_BATCH}, {size} (median of {st['runs']})",
            f"{s['unet_step']['median_s']:.3f} s",
            f"{d['unet_step']['median_s']:.3f} s",
            r["unet_step_s"],
        ),
        (
            f"txt2img {size}, {st['steps']} steps, cfg {st['cfg_scale']} (median of {st['runs']})",
            f"{s['txt2img']['median_s']:.2f} s",
            f"{d['txt2img']['median_s']:.2f} s",
            r["txt2img_s"],
        ),
        ("peak RSS of the process", gib(s["peak_rss_bytes"]), gib(d["peak_rss_bytes"]), r["peak_rss_bytes"]),
        (
            "RSS after load",
            gib(s["rss_after_load_bytes"]),
            gib(d["rss_after_load_bytes"]),
            r["rss_after_load_bytes"],
        ),
        ("threads", str(s["threads"]), str(d["threads"]), None),
    ]
    lines = [
        "| metric | sdrt (ONNX Runtime fp32) | diffusers (PyTorch fp32) | ratio sdrt/diffusers |",
        "|---|---|---|---|",
    ]
    lines += [f"| {m} | {a} | {b} | {'' if x is None else f'{x:.2f}'} |" for m, a, b, x in rows]
    c, e = report["comparison"], report["export"]
    if "error" in c:
        lines.append(f"| same-seed outputs | {c['error']} | | |")
    else:
        lines.append(
            f"| same-seed image, max abs pixel difference | {c['image_max_abs_diff']}/255 "
            f"(mean {c['image_mean_abs_diff']:.3f}) | | |"
        )
        lines.append(
            f"| same-input UNet output, max abs difference | {c['unet_max_abs_diff']:.2e} "
            f"(output max {c['unet_max_abs_output']:.2f}) | | |"
        )
    when = "this run" if e["measured_in_this_run"] else f"earlier run, {e['date']}"
    lines.append(f"| `sdrt export` wall time ({when}) | {e['wall_s']:.1f} s | | |")
    lines.append(f"| `sdrt export` peak RSS ({when}) | {gib(e['peak_rss_bytes'])} | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="sdrt (ONNX Runtime fp32) vs diffusers (PyTorch fp32) on the CPU, full-size SD 1.5 random weights"
    )
    parser.add_argument("--steps", type=int, default=10, help="txt2img sampling steps (default 10)")
    parser.add_argument("--size", type=int, default=256, help="image width = height in pixels (default 256)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up; median reported")
    parser.add_argument("--seed", type=int, default=1234, help="generation seed (both runtimes)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sdrt-bench"), help="model folders (reused)")
    parser.add_argument("--rebuild", action="store_true", help="build and export the model again")
    parser.add_argument("--small", action="store_true", help="tiny random models: a quick smoke test")
    parser.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/<machine>.json)")
    parser.add_argument("--worker", nargs=2, metavar=("STAGE", "JOB"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(*args.worker)
        return 0
    if args.size <= 0 or args.size % LATENT_DOWNSAMPLE:
        parser.error(f"--size {args.size}: expected a positive multiple of {LATENT_DOWNSAMPLE}")
    if args.steps < 1 or args.runs < 1:
        parser.error("--steps and --runs must be at least 1")

    machine = describe_machine()
    log(f"machine: {machine['cpu_model']}, {machine['physical_cores']} cores, {gib(machine['ram_bytes'])} RAM")
    load_start = os.getloadavg()
    if load_start[0] > BUSY_LOAD:
        log(f"warning: load average {load_start[0]:.2f}: other processes share the CPU, timings will be noisy")
    configs = (
        {"unet_config": SMALL_UNET, "vae_config": SMALL_VAE, "text_config": dict(SMALL_TEXT, vocab_size=None)}
        if args.small
        else {"unet_config": SD15_UNET, "vae_config": SD15_VAE, "text_config": SD15_TEXT}
    )
    model_dir = args.workdir.resolve() / ("small" if args.small else "sd15")
    job_dir, out_dir = model_dir / "jobs", model_dir / "outputs"
    for folder in (job_dir, out_dir):
        folder.mkdir(parents=True, exist_ok=True)
    built, exported = prepare_model(args, configs, model_dir, job_dir)

    settings = {
        "model": "tiny random models (--small)" if args.small else "SD 1.5 architecture, random weights",
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "cfg_scale": CFG_SCALE,
        "sampler": SAMPLER,
        "scheduler": "automatic (diffusers EulerDiscreteScheduler from the SD 1.5 PNDM config)",
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "seed": args.seed,
        "runs": args.runs,
        "warmup_runs": 1,
        "unet_batch": UNET_BATCH,
        "unet_timestep": UNET_TIMESTEP,
        "precision": "fp32",
        "workdir": str(model_dir),
        "load_average_1min_at_start": load_start[0],
    }
    job = {
        "diffusers_dir": str(model_dir / "diffusers"),
        "onnx_dir": str(model_dir / "onnx"),
        "out_dir": str(out_dir),
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "runs": args.runs,
        "seed": args.seed,
        "latent_channels": configs["unet_config"]["in_channels"],
        "context_dim": configs["unet_config"]["cross_attention_dim"],
        "text_max_length": configs["text_config"]["max_position_embeddings"],
    }
    measured = {}
    for runtime in ("sdrt", "diffusers"):
        log(f"{runtime}: starting its own subprocess")
        result, wall, peak = run_child(runtime, job, job_dir)
        measured[runtime] = {**result, "process_wall_s": wall, "peak_rss_bytes": peak}
        log(f"{runtime}: done in {wall:.1f} s, peak RSS {gib(peak)}")
    s, d = measured["sdrt"], measured["diffusers"]
    report = {
        "benchmark": "cpu_e2e",
        "schema_version": SCHEMA_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.small,
        "machine": machine,
        "settings": settings,
        "model": {
            "weights_seed": WEIGHTS_SEED,
            "parameters": built["parameters"],
            "unet_config": configs["unet_config"],
            "vae_config": configs["vae_config"],
            "text_config": configs["text_config"],
            "tokenizer": "tiny CLIP vocabulary from tests/tiny_sd.py (ids only index the embedding)",
        },
        "export": exported,
        "sdrt": s,
        "diffusers": d,
        "comparison": compare_outputs(out_dir),
        "ratios": {  # sdrt / diffusers: below 1 means sdrt is faster or smaller
            "load_s": ratio(s["load_s"], d["load_s"]),
            "import_s": ratio(s["import_s"], d["import_s"]),
            "unet_step_s": ratio(s["unet_step"]["median_s"], d["unet_step"]["median_s"]),
            "txt2img_s": ratio(s["txt2img"]["median_s"], d["txt2img"]["median_s"]),
            "peak_rss_bytes": ratio(s["peak_rss_bytes"], d["peak_rss_bytes"]),
            "rss_after_load_bytes": ratio(s["rss_after_load_bytes"], d["rss_after_load_bytes"]),
        },
    }
    table = markdown_table(report)
    report["table_markdown"] = table
    output = args.output or RESULTS_DIR / f"{'smoke-' if args.small else ''}{machine['slug']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{settings['model']} on {machine['cpu_model']} ({machine['physical_cores']} cores)\n")
    print(table)
    log(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
