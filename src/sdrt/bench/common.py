"""What every benchmark run shares: settings, machine description, subprocess workers, the random-weight model
build and its export. Each runtime is measured in its own subprocess (`python -m sdrt.bench --worker STAGE JOB`),
so each one's peak memory is its own."""

import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from sdrt.bench.fixtures import SD15_SCHEDULER, assemble_pipeline, write_tiny_clip_tokenizer

REPO = Path(__file__).resolve().parents[3]  # a source checkout (benchmarks/results)
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

# Wall-clock start of the whole benchmark; the subprocesses inherit it, so all progress lines share one clock.
_T0 = float(os.environ.setdefault("CPU_E2E_T0", str(time.time())))


def log(message: str) -> None:
    """Progress line on stderr: seconds since the benchmark started, then MESSAGE."""
    print(f"[sdrt bench {time.time() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


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


def sdrt_version() -> str:
    """sdrt's version, from `git describe` in a source checkout (commit, and "-dirty" with local changes); a copy
    without .git (a GPU machine's) names its commit in SDRT_COMMIT."""
    from sdrt.version import __version__

    if os.environ.get("SDRT_COMMIT"):
        return f"{__version__}+g{os.environ['SDRT_COMMIT']}"
    try:
        described = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--tags"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{described}" if described else __version__


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
            **{name: package_version(name) for name in ("numpy", "onnxruntime", "torch", "diffusers", "transformers",
                                                         "onnx")},  # fmt: skip
            "sdrt": sdrt_version(),
        },
    }


# ----------------------------------------------------------------------------------------------- subprocesses


def run_child(
    stage: str, job: dict, job_dir: Path, fatal: bool = True, timeout: float | None = None, label: str | None = None,
    module: str = "sdrt.bench", python=None,
) -> tuple[dict, float, int]:
    """Run `python -m MODULE --worker STAGE JOB` (default `sdrt.bench`) in a subprocess: (its result, wall seconds,
    its peak RSS in bytes).

    The peak RSS comes from wait4's rusage of that one child, so each runtime's figure is its own. A failed child
    ends the benchmark, or with FATAL False raises RuntimeError; one still running after TIMEOUT seconds is killed.
    LABEL names its job files (default STAGE: one child per stage). PYTHON: another venv's interpreter (a peer
    whose pins differ from sdrt's), given sdrt's source on PYTHONPATH.
    """
    import threading

    label = label or stage
    job_file = job_dir / f"{label}.job.json"
    result_file = job_dir / f"{label}.result.json"
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps(dict(job, result_file=str(result_file)), indent=2))
    start = time.perf_counter()
    env = None
    if python is not None:
        paths = [str(REPO / "src"), os.environ.get("PYTHONPATH")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    command = [str(python or sys.executable), "-m", module]
    proc = subprocess.Popen([*command, "--worker", stage, str(job_file)], env=env)
    killer = threading.Timer(timeout, proc.kill) if timeout else None
    if killer is not None:
        killer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if killer is not None:
            killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if timeout and time.perf_counter() - start >= timeout and proc.returncode != 0:
        message = f"the {label} subprocess ran past its {timeout:.0f} s limit and was stopped"
        if fatal:
            sys.exit(f"sdrt bench: {message}")
        raise RuntimeError(message)
    wall = time.perf_counter() - start
    peak_rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB
    if (proc.returncode != 0 or not result_file.is_file()) and not fatal:
        raise RuntimeError(f"the {label} subprocess failed (exit status {proc.returncode})")
    if proc.returncode != 0 or not result_file.is_file():
        sys.exit(f"sdrt bench: the {label} subprocess failed (exit status {proc.returncode}); see its errors above")
    return json.loads(result_file.read_text()), wall, peak_rss



def pipeline_txt2img(pipe, job: dict, images: list):
    """A diffusers-API pipeline's (diffusers', optimum-intel's) txt2img of the job: the bench's prompt, negative
    prompt, size, steps, cfg and seed; the returned callable appends its image, (H, W, 3) uint8, to IMAGES."""
    import numpy as np
    import torch

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

    return txt2img

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


def unet_added_inputs(job: dict) -> dict:
    """SDXL's extra UNet feeds, the same for both runtimes: pooled text (B, 1280) and micro-conditioning (B, 6)."""
    import numpy as np

    if job.get("pipeline", "sd") != "sdxl":
        return {}
    rng = np.random.default_rng(job["seed"] + 1)
    size = [job["height"], job["width"], 0, 0, job["height"], job["width"]]  # original, crop, target
    return {
        "text_embeds": rng.standard_normal((UNET_BATCH, 1280), dtype=np.float32),
        "time_ids": np.tile(np.array(size, dtype=np.float32), (UNET_BATCH, 1)),
    }


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
    """The job's case, built by its pipeline kind (BUILDERS) with random weights, saved as a diffusers folder."""
    kind = job.get("pipeline", "sd")
    if kind not in BUILDERS:
        sys.exit(f"sdrt bench: no builder for pipeline kind {kind!r} (known: {', '.join(BUILDERS)})")
    return BUILDERS[kind](job)


def build_sd(job: dict) -> dict:
    """Random-weight SD 1.x/2.x pipeline of the job's configs -> a diffusers folder (written whole, then renamed)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
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


def build_sdxl(job: dict) -> dict:
    """Random-weight SDXL base (sdrt.bench.sdxl_arch, one part at a time, fp16 weights that both runtimes
    load as float32) -> a diffusers folder (written whole, then renamed)."""
    from sdrt.bench.sdxl_arch import build_sdxl_folder

    out = Path(job["diffusers_dir"])
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    from safetensors import safe_open

    build_sdxl_folder(staging, dtype="fp16", seed=job["weights_seed"])
    params = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        with safe_open(next((staging / name).glob("*.safetensors")), "np") as f:
            params[name] = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return {"parameters": params}


BUILDERS = {"sd": build_sd, "sdxl": build_sdxl}  # pipeline kind -> builder


def worker_export(job: dict) -> dict:
    from sdrt.export import export

    start = time.perf_counter()
    export(job["diffusers_dir"], job["onnx_dir"], precision=job.get("precision", "fp32"), overwrite=True, progress=True)
    return {"export_call_s": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------- stages


def onnx_is_current(onnx_dir: Path) -> bool:
    """True if ONNX_DIR holds an export this sdrt can load (its manifest reads and validates)."""
    from sdrt.errors import ModelError
    from sdrt.runtime.manifest import Manifest

    try:
        Manifest.load(onnx_dir)
    except ModelError:
        return False
    return True


def prepare_model(args, configs: dict, model_dir: Path, job_dir: Path, precision: str = "fp32") -> tuple[dict, dict]:
    """Build and export (at PRECISION) unless already done (or --rebuild): (build info, export measurements)."""
    suffix = "" if precision == "fp32" else f"-{precision}"
    diffusers_dir, onnx_dir = model_dir / "diffusers", model_dir / f"onnx{suffix}"
    build_file, export_file = model_dir / "build.json", model_dir / f"export{suffix}.json"
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
        job = {"diffusers_dir": str(diffusers_dir), "onnx_dir": str(onnx_dir), "precision": precision}
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


def base_job(args, configs: dict, model_dir: Path, onnx_dir: Path, out_dir: Path) -> dict:
    """The fields every runner's child job takes: model folders, the generation settings, the UNet's input sizes."""
    return {
        "diffusers_dir": str(model_dir / "diffusers"),
        "onnx_dir": str(onnx_dir),
        "out_dir": str(out_dir),
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "runs": args.runs,
        "seed": args.seed,
        "latent_channels": configs["unet_config"]["in_channels"],
        "context_dim": configs["unet_config"]["cross_attention_dim"],
        "text_max_length": configs["text_config"]["max_position_embeddings"],
        "pipeline": configs.get("pipeline", "sd"),
    }


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


def busy_warning() -> float:
    """The 1-minute load average, with a warning when other processes make timings noisy."""
    load = os.getloadavg()[0]
    if load > BUSY_LOAD:
        log(f"warning: load average {load:.2f}: other processes share the CPU, timings will be noisy")
    return load


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def block_torch() -> None:
    """Make `import torch` (and diffusers, transformers) fail in this process: sdrt's memory is then its own."""
    for name in ("torch", "diffusers", "transformers"):
        sys.modules[name] = None


def write_results(report: dict, output: Path, table: str, chart_title: str, bars: list) -> None:
    """OUTPUT (JSON), OUTPUT with .md (the table) and .png (the chart of BARS: (label, value, unit) rows)."""
    from sdrt.bench.chart import bar_chart

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    output.with_suffix(".md").write_text(table + "\n")
    if bars:
        bar_chart(chart_title, bars).save(output.with_suffix(".png"))
    log(f"wrote {output} (+ .md, .png)")
