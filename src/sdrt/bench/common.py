"""What every benchmark run shares: settings, machine description, subprocess workers, the random-weight model
build and its export. Each runtime is measured in its own subprocess (`python -m sdrt.bench --worker STAGE JOB`),
so each one's peak memory is its own."""

import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


def pipeline_txt2img(pipe, job: dict, images: list, guidance: dict | None = None):
    """A diffusers-API pipeline's (diffusers', optimum-intel's) txt2img of the job: the bench's prompt, negative
    prompt, size, steps, cfg (GUIDANCE: other guidance keywords, flow_arch.FLOW_KINDS) and seed; the returned
    callable appends its image, (H, W, 3) uint8, to IMAGES."""
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
                **(guidance or {"guidance_scale": CFG_SCALE}),
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


def added_text_width(unet_config: dict) -> int | None:
    """The pooled text width of a UNet with added text/time conditioning (SDXL's: its class-embedding input less
    6 time ids of addition_time_embed_dim Fourier features each), or None for one without."""
    if unet_config.get("addition_embed_type") != "text_time":
        return None
    return unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config.get("addition_time_embed_dim", 256)


def unet_added_inputs(job: dict) -> dict:
    """A UNet's added conditioning feeds (SDXL's), the same for both runtimes: pooled text (B, P) and
    micro-conditioning (B, 6); none for UNets without it (job["added_text_width"] None)."""
    import numpy as np

    if not job.get("added_text_width"):
        return {}
    rng = np.random.default_rng(job["seed"] + 1)
    size = [job["height"], job["width"], 0, 0, job["height"], job["width"]]  # original, crop, target
    return {
        "text_embeds": rng.standard_normal((UNET_BATCH, job["added_text_width"]), dtype=np.float32),
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


# ----------------------------------------------------------------------------------------------- stages


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
        "context_dim": configs["unet_config"].get("cross_attention_dim"),  # (a flow transformer has none)
        "text_max_length": configs["text_config"]["max_position_embeddings"],
        "pipeline": configs.get("pipeline", "sd"),
        # a UNet with added text/time conditioning (SDXL's): its pooled width, else None
        "added_text_width": added_text_width(configs["unet_config"]),
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


def add_stage_arguments(p, out: str) -> None:
    """A benchmark run in worker stages on `sdrt bench`'s models: --worker (a stage, internal), --workdir (the
    models), --out (OUT: its own folders), --model (sd15, sdxl, or small: a smoke test), --size and --steps."""
    import argparse
    from pathlib import Path

    p.add_argument("--worker", nargs=2, metavar=("STAGE", "JOB"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sdrt-bench"), help="sdrt bench's model folders")
    p.add_argument("--out", type=Path, default=Path(out), help="this benchmark's folders")
    p.add_argument("--model", default="sd15", choices=("sd15", "sdxl", "small"), help="small: a smoke test")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
