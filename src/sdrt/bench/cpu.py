"""CPU benchmark: sdrt (ONNX Runtime fp32; OpenVINO f32, and bf16 where the CPU has it) against diffusers (PyTorch
fp32) and optimum-intel's OpenVINO pipeline, side by side, on identical weights.

Builds the case's architecture with random weights, exports it with `sdrt.export.export`, then measures each
runtime in its own subprocess: load time, one batch-2 UNet call, txt2img end to end, peak RSS; with --low-vram
also sdrt with its engines staged one at a time. Writes benchmarks/results/<machine>.json (+ .md, .png).
"""

import os
import time
import warnings
from pathlib import Path

from sdrt.bench import flow_arch
from sdrt.bench.common import (
    CFG_SCALE,
    NEGATIVE_PROMPT,
    PROMPT,
    RESULTS_DIR,
    SAMPLER,
    SCHEMA_VERSION,
    UNET_BATCH,
    UNET_TIMESTEP,
    WEIGHTS_SEED,
    base_job,
    busy_warning,
    compare_outputs,
    gib,
    log,
    measure,
    now_iso,
    pipeline_txt2img,
    ratio,
    rss_now,
    run_child,
    unet_added_inputs,
    unet_inputs,
    write_results,
)
from sdrt.bench.cpu_runtimes import CPU_RUNTIMES, compare_runtimes, run_runtimes, runtimes_table
from sdrt.bench.machine import describe_machine, physical_cores
from sdrt.bench.random_model import prepare_model


def worker_sdrt(job: dict) -> dict:
    """sdrt's runtime (run in a process where torch cannot be imported); job["low_vram"]: engines staged."""
    label = job.get("label", "sdrt")
    os.environ.update(job.get("env", {}))  # SDRT_NO_OV_CACHE: OpenVINO compiles cold, as its peer does
    start = time.perf_counter()
    import numpy as np

    from sdrt.runtime.pipeline import Pipeline

    import_s = time.perf_counter() - start
    log("sdrt: loading the ONNX models")
    start = time.perf_counter()
    pipe = Pipeline.load(job["onnx_dir"], backend=job.get("backend", "cpu"), low_vram=job.get("low_vram", False))
    load_s = time.perf_counter() - start
    log(f"{label}: loaded in {load_s:.1f} s")
    rss_after_load = rss_now()
    unet = pipe.engines["unet"] if "unet" in pipe.engines else None
    if unet is not None:
        sample, timestep, context = unet_inputs(job)
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": context, **unet_added_inputs(job)}
    unet, feeds, guidance = flow_arch.sdrt_probe(pipe, job, UNET_BATCH) or (unet, feeds, {"cfg_scale": CFG_SCALE})
    outputs = {}

    def unet_call():
        outputs["unet"] = unet.run(feeds)["out_sample"]  # (B, C, h, w) float32

    log(f"{label}: UNet, batch {UNET_BATCH}, {job['width']}x{job['height']}")
    unet_stats = measure(f"{label} UNet", unet_call, job["runs"])
    np.save(Path(job["out_dir"]) / f"{label}_unet.npy", outputs["unet"])

    images = []

    def txt2img():
        out = pipe.generate(
            PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            width=job["width"],
            height=job["height"],
            steps=job["steps"],
            **guidance,
            sampler=SAMPLER,
            scheduler="automatic",
            seed=job["seed"],
            progress=False,
        )
        images.append(np.asarray(out[0]))  # (H, W, 3) uint8

    log(f"{label}: txt2img {job['width']}x{job['height']}, {job['steps']} steps")
    e2e_stats = measure(f"{label} txt2img", txt2img, job["runs"])
    np.save(Path(job["out_dir"]) / f"{label}_image.npy", images[-1])
    precisions = {name: getattr(e, "inference_precision", None) for name, e in pipe.engines.items()}
    return {
        "backend": pipe.backend,
        "inference_precision": {name: p for name, p in precisions.items() if p} or "fp32",
        "import_s": import_s,
        "load_s": load_s,
        "rss_after_load_bytes": rss_after_load,
        "threads": unet.threads,
        "unet_step": unet_stats,
        "txt2img": e2e_stats,
        "images_repeatable": all(np.array_equal(im, images[0]) for im in images),
    }


def worker_diffusers(job: dict) -> dict:
    """diffusers' pipeline of the case (DiffusionPipeline picks it from model_index.json), fp32 on the CPU, torch
    threads = physical cores."""
    start = time.perf_counter()
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

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
    pipe = DiffusionPipeline.from_pretrained(job["diffusers_dir"], torch_dtype=torch.float32)
    flow = flow_arch.diffusers_probe(pipe, job, UNET_BATCH, job["onnx_dir"], torch.from_numpy)
    if flow is None:  # the flow families keep their FlowMatchEulerDiscreteScheduler (sdrt's Euler on them)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    log(f"diffusers: loaded in {load_s:.1f} s")
    rss_after_load = rss_now()
    denoiser, guidance = flow or (None, None)
    network = getattr(pipe, "unet", None) or pipe.transformer  # the denoiser network
    if flow is None:
        sample, timestep, context = (torch.from_numpy(x) for x in unet_inputs(job))
        added = {name: torch.from_numpy(x) for name, x in unet_added_inputs(job).items()} or None
        denoiser = lambda: pipe.unet(sample, timestep, context, added_cond_kwargs=added, return_dict=False)[0]  # noqa: E731
    outputs = {}

    def unet_call():
        with torch.inference_mode():
            outputs["unet"] = denoiser()

    log(f"diffusers: UNet, batch {UNET_BATCH}, {job['width']}x{job['height']}")
    unet_stats = measure("diffusers UNet", unet_call, job["runs"])
    np.save(Path(job["out_dir"]) / "diffusers_unet.npy", outputs["unet"].numpy())

    images = []
    txt2img = pipeline_txt2img(pipe, job, images, guidance)
    log(f"diffusers: txt2img {job['width']}x{job['height']}, {job['steps']} steps")
    e2e_stats = measure("diffusers txt2img", txt2img, job["runs"])
    np.save(Path(job["out_dir"]) / "diffusers_image.npy", images[-1])
    return {
        "import_s": import_s,
        "load_s": load_s,
        "rss_after_load_bytes": rss_after_load,
        "threads": torch.get_num_threads(),
        "attention_processor": type(next(iter(network.attn_processors.values()))).__name__,
        "unet_step": unet_stats,
        "txt2img": e2e_stats,
        "images_repeatable": all(np.array_equal(im, images[0]) for im in images),
    }


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


def low_vram_rows(report: dict) -> list[str]:
    """Table rows for sdrt with staged engines (--low-vram), against sdrt with all engines resident."""
    s, low = report["sdrt"], report.get("sdrt_low_vram")
    if not low:
        return []
    return [
        f"| sdrt --low-vram: peak RSS | {gib(low['peak_rss_bytes'])} | | "
        f"{ratio(low['peak_rss_bytes'], s['peak_rss_bytes']):.2f} of sdrt's |",
        f"| sdrt --low-vram: txt2img (median) | {low['txt2img']['median_s']:.2f} s | | "
        f"{ratio(low['txt2img']['median_s'], s['txt2img']['median_s']):.2f} of sdrt's |",
    ]


def guidance_settings(pipeline: str) -> dict:
    """The guidance both runtimes use: CFG_SCALE, or a flow case's own (FLUX dev: distilled guidance, CFG 1)."""
    kind = flow_arch.FLOW_KINDS.get(pipeline) or {}
    return {"cfg_scale": CFG_SCALE, **kind.get("sdrt", {})}


def cpu_settings(args, case, model_dir: Path, load_start: float) -> dict:
    """The run's settings, as its report records them."""
    return {
        "model": case.description,
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        **guidance_settings(case.pipeline),
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
        "load_average_1min_at_start": load_start,
    }


def run_cpu(args, case) -> int:
    """The CPU benchmark of CASE (cases.ModelCase) with ARGS (see sdrt.bench.parser)."""
    machine = describe_machine()
    log(f"machine: {machine['cpu_model']}, {machine['physical_cores']} cores, {gib(machine['ram_bytes'])} RAM")
    load_start = busy_warning()
    configs = case.configs()
    model_dir = args.workdir.resolve() / case.name
    job_dir, out_dir = model_dir / "jobs", model_dir / "outputs"
    for folder in (job_dir, out_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.npy"):  # an earlier run's images (another size) must not be compared with this one's
        stale.unlink()
    built, exported = prepare_model(args, configs, model_dir, job_dir)
    settings = cpu_settings(args, case, model_dir, load_start)
    job = base_job(args, configs, model_dir, model_dir / "onnx", out_dir)
    names = args.runtimes.split(",") if args.runtimes else [n for n in CPU_RUNTIMES if n != "sdrt_auto_cached"]
    names = list(dict.fromkeys(["sdrt", *names, "diffusers"]))  # the sdrt-vs-diffusers table needs both
    measured, skipped, peer_export = run_runtimes(names, job, model_dir, job_dir)
    if args.low_vram:
        log("sdrt_low_vram: starting its own subprocess")
        result, wall, peak = run_child("sdrt", {**job, "low_vram": True, "label": "sdrt_low_vram"}, job_dir)
        measured["sdrt_low_vram"] = {**result, "process_wall_s": wall, "peak_rss_bytes": peak}
    s, d = measured["sdrt"], measured["diffusers"]
    report = {
        "benchmark": "cpu_e2e",
        "schema_version": SCHEMA_VERSION,
        "date": now_iso(),
        "smoke": case.smoke,
        "machine": machine,
        "settings": settings,
        "model": {
            "case": case.name,
            "weights_seed": WEIGHTS_SEED,
            "parameters": built["parameters"],
            **configs,
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
    if "sdrt_low_vram" in measured:
        report["sdrt_low_vram"] = measured["sdrt_low_vram"]
    compared = compare_runtimes(out_dir, list(measured))
    report.update(runtimes=measured, runtimes_skipped=skipped, runtimes_comparison=compared)
    if peer_export:
        report["optimum_intel_export"] = peer_export
    table = "\n".join([markdown_table(report), *low_vram_rows(report)])
    table += "\n\n" + runtimes_table(measured, compared, skipped)
    report["table_markdown"] = table
    output = args.output or RESULTS_DIR / f"{'smoke-' if case.smoke else ''}{machine['slug']}.json"
    bars = [(f"{name} txt2img", m["txt2img"]["median_s"], "s") for name, m in measured.items()]
    title = f"{settings['model']}, {args.size}x{args.size}, {args.steps} steps, {machine['cpu_model']}"
    write_results(report, output, table, title, bars)
    print(f"\n{settings['model']} on {machine['cpu_model']} ({machine['physical_cores']} cores)\n")
    print(table)
    return 0


def sdrt_worker(job: dict) -> dict:
    """The sdrt stage as its subprocess runs it: torch blocked first."""
    from sdrt.bench.common import block_torch

    block_torch()
    return worker_sdrt(job)


def diffusers_worker(job: dict) -> dict:
    return worker_diffusers(job)
